"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2): a student learns to take in one DDIM step what its teacher
takes in two, halving the sampling steps per round (64 -> 32 -> ... -> 4 -> ...).

The teacher is a v-prediction DDPM family run (or a previous round's student) sampled by
deterministic DDIM on a ``2N``-step grid; the student samples by DDIM on the ``N``-step grid,
which must be every other point of the teacher's (with "trailing" spacing and T divisible by
2N it is).  For a noisy z_t at a student grid point t, two teacher steps t -> t' -> t'' give
z_t''; the target is the x that one DDIM step from z_t must predict to land there,

    x~ = (z_t'' - (s_t''/s_t) z_t) / (a_t'' - (s_t''/s_t) a_t),   a = sqrt(ab), s = sqrt(1 - ab)

(the paper's Algorithm 2), and the loss is the truncated-SNR weighted x error
max(a_t^2/s_t^2, 1) |x~ - x^_theta(z_t)|^2 (the paper's "truncated SNR" weighting, Sec. 4).
The condition (after dropout) goes to teacher and student alike, so classifier-free guidance
still works on the student.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field
from torch import Tensor

from models.base import FamilyConfig, LossOut, randn
from models.ddpm import DDPM, DDPMConfig
from models.diffusion import q_sample, respace, x0_eps_from_pred
from models.samplers import ddim_step
from models.teacher import TeacherError, TeacherMixin, same_fields

_SAME = ("net", "net_size", "net_overrides", "image_size", "channels", "data", "conditioning", "num_classes",
         "text_encoder", "text_tokens", "prediction", "schedule", "timesteps", "spacing")


class ProgressiveConfig(DDPMConfig):
    prediction: Literal["eps", "v"] = Field("v", description="v-prediction (required: eps is unstable at few steps, paper Sec. 4)")
    teacher: str = Field("", description="Teacher checkpoint folder (a DDPM v-prediction run or a previous round)")
    student_steps: int = Field(4, ge=1, le=4096, description="DDIM steps of the student (the teacher takes 2x)")


class ProgressiveDistillation(TeacherMixin, DDPM):
    name: ClassVar[str] = "progressive"
    Config: ClassVar[type[FamilyConfig]] = ProgressiveConfig
    samplers: ClassVar[tuple[str, ...]] = ("ddim",)
    default_sampler: ClassVar[str] = "ddim"
    default_steps: ClassVar[int] = 4
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"ddim": ()}

    cfg: ProgressiveConfig

    def __init__(self, cfg: ProgressiveConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        if c.prediction != "v":
            raise TeacherError(f"progressive distillation trains a v-prediction student; got prediction={c.prediction!r}")
        self.default_steps = c.student_steps  # the student's own step count is its default
        T = c.timesteps
        if 2 * c.student_steps > T:
            raise TeacherError(f"student_steps={c.student_steps}: the teacher would need {2 * c.student_steps} steps "
                               f"but has only T={T} timesteps")
        self.student_grid = respace(T, c.student_steps, c.spacing)
        self.teacher_grid = respace(T, 2 * c.student_steps, c.spacing)
        if not torch.equal(self.teacher_grid[::2], self.student_grid):
            raise TeacherError(f"student_steps={c.student_steps} cannot be reached from a {2 * c.student_steps}-step "
                               f"teacher with spacing={c.spacing!r} and T={T}: the student grid "
                               f"{self.student_grid.tolist()[:6]}... is not every other teacher point "
                               f"{self.teacher_grid.tolist()[:12]}...; use spacing='trailing' and T divisible by "
                               f"{2 * c.student_steps}")

        def check(teacher: Any) -> None:
            same_fields(c, teacher.cfg, _SAME, "progressive distillation")
            if teacher.name == "progressive" and teacher.cfg.student_steps != 2 * c.student_steps:
                raise TeacherError(f"the teacher is a {teacher.cfg.student_steps}-step student; this round needs a "
                                   f"{2 * c.student_steps}-step teacher (halve one round at a time)")

        self.init_teacher(None, check)

    def _teacher_step(self, z: Tensor, t: Tensor, ab_t: Tensor, ab_next: Tensor, cond: dict[str, Tensor]) -> Tensor:
        clip = 1.0 if self.cfg.data == "pixels" else None
        out = self.teacher.net(z, t, cond)
        z_next, _ = ddim_step(z, out.float(), ab_t, ab_next, 0.0, "v", None, clip)
        return z_next.to(z.dtype)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x0 = self.check_images(batch)
        cond = self.training_condition(batch, generator)
        B, dev = x0.shape[0], x0.device
        N = self.cfg.student_steps
        g_dev = generator.device if generator is not None else dev
        j = torch.randint(0, N, (B,), generator=generator, device=g_dev).cpu()
        ab = self.alphas_cumprod  # float64 CPU, indexed by timestep
        tg = self.teacher_grid
        t0, t1 = tg[2 * j], tg[2 * j + 1]
        last = 2 * j + 2 >= len(tg)
        t2 = tg[torch.where(last, 0, 2 * j + 2)]
        ab0, ab1 = ab[t0], ab[t1]
        ab2 = torch.where(last, torch.ones_like(ab0), ab[t2])  # the last step lands on the data (ab = 1)
        eps = randn(x0.shape, generator, dev, x0.dtype)
        z0 = q_sample(x0, t0.to(dev), eps, ab).to(x0.dtype)
        with torch.no_grad():
            z1 = self._teacher_step(z0, t0.to(dev), ab0, ab1, cond)
            z2 = self._teacher_step(z1, t1.to(dev), ab1, ab2, cond)
        a0, s0 = ab0.sqrt(), (1 - ab0).sqrt()
        a2, s2 = ab2.sqrt(), (1 - ab2).sqrt()
        r = (s2 / s0).view(-1, 1, 1, 1).to(dev)
        denom = (a2 - (s2 / s0) * a0).view(-1, 1, 1, 1).to(dev)
        x_target = ((z2.double() - r * z0.double()) / denom).float()
        out = self.net(z0, t0.to(dev), cond)
        x_hat, _ = x0_eps_from_pred(out.float(), z0.float(), ab0.to(dev), "v")
        weight = torch.clamp(ab0 / (1 - ab0), min=1.0).to(dev).float()  # truncated SNR
        per = ((x_hat.float() - x_target) ** 2).mean(dim=(1, 2, 3))
        loss = (weight * per).mean()
        return LossOut({"model": loss}, {"loss": float(loss.detach()), "x_mse": float(per.mean().detach())})
