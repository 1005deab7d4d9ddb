"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2), with the
guidance-distillation option of latent consistency models (Luo et al. 2023, LCM).

The teacher is an EDM family run.  The consistency function keeps EDM's network F but with the
boundary condition f(x, sigma_min) = x:

    f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)),
    c_skip = sd^2 / ((s - s_min)^2 + sd^2),  c_out = (s - s_min) sd / sqrt(s^2 + sd^2)

(paper Appendix C), c_in and c_noise as in EDM.  Training: on the Karras grid of N levels
s_1 > ... > s_N = s_min pick adjacent levels (s_hi, s_lo), put x0 + s_hi z, let the teacher take
one ODE step (Heun or Euler; with guidance w on a conditional teacher: D_u + w (D_c - D_u)) to
s_lo, and pull the student's f(., s_hi) towards the *target network's* f(., s_lo).  The target
network is an EMA of the student with decay ``target_ema`` (``after_step``), kept in the
state_dict so checkpoints resume exactly.  Distance: squared L2 or the pseudo-Huber metric of
Song & Dhariwal 2023 (c = 0.00054 sqrt(d)).  Sampling: multistep consistency sampling with 1-4
steps (paper Algorithm 1) on a Karras grid of the chosen number of levels.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field
from torch import Tensor

from models.base import FamilyConfig, LossOut, randn
from models.diffusion import edm_precond, expand_to, karras_sigmas
from models.edm import EDM, EDMConfig
from models.samplers import SampleResult
from models.teacher import TeacherError, TeacherMixin, frozen_copy, same_fields

_SAME = ("net", "net_size", "net_overrides", "image_size", "channels", "data", "conditioning", "num_classes",
         "text_encoder", "text_tokens", "sigma_data")


class ConsistencyConfig(EDMConfig):
    teacher: str = Field("", description="Teacher checkpoint folder (an EDM run)")
    levels: int = Field(18, ge=2, le=4096, description="N: noise levels of the Karras grid distilled along")
    target_ema: float = Field(0.95, ge=0.0, lt=1.0, description="EMA decay of the target network (paper: 0.95)")
    distance: Literal["l2", "pseudo_huber"] = Field("pseudo_huber", description="Consistency loss metric")
    teacher_solver: Literal["heun", "euler"] = Field("heun", description="Teacher ODE step between adjacent levels")
    teacher_guidance: float = Field(1.0, ge=0.0, le=50.0, description="CFG scale baked into the student (LCM); "
                                    "1 = plain teacher")
    sample_steps: int = Field(1, ge=1, le=16, description="Default consistency sampling steps")


class ConsistencyFunction:
    """The consistency function f(x, sigma) on an EDM network, its distance and the multistep
    consistency sampler: shared by consistency distillation and consistency training (models/ict.py).
    Reads ``cfg.sigma_min``, ``sigma_max``, ``sigma_data``, ``rho`` and ``distance``."""

    def _coeffs(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = self.cfg  # type: ignore[attr-defined]
        s = sigma.double()
        sd = c.sigma_data
        c_skip = sd**2 / ((s - c.sigma_min) ** 2 + sd**2)
        c_out = (s - c.sigma_min) * sd / (s**2 + sd**2).sqrt()
        _, _, c_in, c_noise = edm_precond(s.clamp(min=1e-12), sd)
        return c_skip, c_out, c_in, c_noise

    def consistency(self, raw: Any, x: Tensor, sigma: Tensor) -> Tensor:
        """f(x, sigma) from a raw network function F(x_in, c_noise)."""
        c_skip, c_out, c_in, c_noise = self._coeffs(sigma)
        f = raw(expand_to(c_in, x) * x, c_noise.to(x.dtype))
        return expand_to(c_skip, x) * x + expand_to(c_out, x) * f

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-sample squared L2 (mean) or pseudo-Huber (Song & Dhariwal 2023, c = 0.00054 sqrt(d))."""
        diff = (pred.float() - target.float()).flatten(1)
        if self.cfg.distance == "l2":  # type: ignore[attr-defined]
            return (diff**2).mean(dim=1)
        cc = 0.00054 * math.sqrt(diff.shape[1])
        return ((diff**2).sum(dim=1) + cc**2).sqrt() - cc

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        """Multistep consistency sampling (paper Algorithm 1) on ``steps`` Karras levels."""
        c = self.cfg  # type: ignore[attr-defined]
        # steps levels from sigma_max down, stopping short of sigma_min (where f is the identity
        # and one more step would cost an NFE and change nothing)
        levels = karras_sigmas(steps + 1, c.sigma_min, c.sigma_max, c.rho)[:-2]
        B = x_T.shape[0]
        x = x_T * c.sigma_max
        x0 = self.consistency(net_fn, x, torch.full((B,), float(levels[0]), device=x.device))
        for s in levels[1:].tolist():
            noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                                dtype=x.dtype).to(x.device)
            x = x0 + math.sqrt(max(s**2 - c.sigma_min**2, 0.0)) * noise
            x0 = self.consistency(net_fn, x, torch.full((B,), s, device=x.device))
        return SampleResult(x0, len(levels))


class ConsistencyDistillation(ConsistencyFunction, TeacherMixin, EDM):
    name: ClassVar[str] = "consistency"
    Config: ClassVar[type[FamilyConfig]] = ConsistencyConfig
    samplers: ClassVar[tuple[str, ...]] = ("consistency",)
    default_sampler: ClassVar[str] = "consistency"
    default_steps: ClassVar[int] = 1
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"consistency": ()}

    cfg: ConsistencyConfig

    def __init__(self, cfg: ConsistencyConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        if c.teacher_guidance != 1.0 and c.conditioning == "none":
            raise TeacherError("teacher_guidance needs a conditional teacher (conditioning='none' here)")
        self.default_steps = c.sample_steps
        self.init_teacher(None, lambda t: same_fields(c, t.cfg, _SAME, "consistency distillation"))
        self.target_net = frozen_copy(self.net)  # a submodule: in the state_dict, out of the optimizer

    def optimizers_spec(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"model": list(self.net.parameters())}

    @torch.no_grad()
    def after_step(self) -> None:
        mu = self.cfg.target_ema
        torch._foreach_lerp_(list(self.target_net.parameters()), list(self.net.parameters()), 1.0 - mu)

    def _teacher_denoiser(self, cond: dict[str, Tensor]) -> Any:
        """The teacher's D(x; sigma) under ``cond``; with teacher_guidance w != 1 its F is
        F_u + w (F_c - F_u), both branches in one doubled-batch forward (cfg_wrap)."""
        from models.diffusion import cfg_wrap

        teacher, w = self.teacher, self.cfg.teacher_guidance
        uncond = self.null_condition(next(iter(cond.values())).shape[0]) if cond and w != 1.0 else None

        def raw(x_in: Tensor, noise: Tensor, **c: Tensor) -> Tensor:
            return teacher.net(x_in, noise, c)

        F = (lambda x_in, noise: raw(x_in, noise, **cond)) if uncond is None else cfg_wrap(raw, w, cond, uncond)

        def D(x: Tensor, sigma: Tensor) -> Tensor:
            c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.cfg.sigma_data)
            f = F(expand_to(c_in, x) * x, c_noise.to(x.dtype))
            return expand_to(c_skip, x) * x + expand_to(c_out, x) * f

        return D

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        c = self.cfg
        x0 = self.check_images(batch)
        cond = self.training_condition(batch, generator)
        B, dev = x0.shape[0], x0.device
        g_dev = generator.device if generator is not None else dev
        grid = karras_sigmas(c.levels, c.sigma_min, c.sigma_max, c.rho)[:-1]  # N levels, no final 0
        i = torch.randint(0, c.levels - 1, (B,), generator=generator, device=g_dev).cpu()
        s_hi, s_lo = grid[i].to(dev), grid[i + 1].to(dev)
        z = randn(x0.shape, generator, dev, x0.dtype)
        x_hi = x0 + expand_to(s_hi, x0) * z
        with torch.no_grad():
            D = self._teacher_denoiser(cond)
            d = (x_hi - D(x_hi, s_hi)) / expand_to(s_hi, x0)
            x_lo = x_hi + expand_to(s_lo - s_hi, x0) * d
            if c.teacher_solver == "heun":
                d2 = (x_lo - D(x_lo, s_lo)) / expand_to(s_lo, x0)
                x_lo = x_hi + expand_to(s_lo - s_hi, x0) * 0.5 * (d + d2)
            target = self.consistency(lambda xi, n: self.target_net(xi, n, cond), x_lo, s_lo)
        pred = self.consistency(lambda xi, n: self.net(xi, n, cond), x_hi, s_hi)
        loss = self.distance(pred, target).mean()
        return LossOut({"model": loss}, {"loss": float(loss.detach())})
