"""Distribution matching distillation (Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation", DMD) of a flow teacher into a one-step generator.

G(z) = z - v_G(z, t=1): one Euler step of a flow network from pure noise, started from the
teacher's weights (so G starts as the teacher's 1-step sample).  Two optimizers:

* ``generator``: the distribution-matching gradient plus the regression loss on teacher pairs.
  For x = G(z) re-noised to x_t = (1 - t) x + t eps (t ~ U[t_min, t_max]), the real and fake
  scores enter through their clean-image predictions x0 = x_t - t v (teacher, with CFG scale
  ``real_guidance``; fake: the online network below):
      grad = (x0_fake - x0_real) / mean|x - x0_real|          (paper eq. 7-8, its per-sample weight)
      L_DM = 1/2 mean |x - sg(x - grad)|^2,                   so dL_DM/dx = grad / numel
  and L_reg = |G(z_pair) - x_pair|^2 on (noise, teacher ODE sample) couplings, the reflow pairs
  dataset (imagegen.distill.reflow_pairs: each sample's noise seed in its .json), weighted by
  ``regression_weight`` (paper: 0.25, with LPIPS; squared L2 here).
* ``fake_score``: the flow-matching loss of a second copy of the teacher's network on the
  generator's (detached) samples, so it tracks the generator's distribution online.

The teacher is frozen and held outside the module tree (models/teacher.py); the student
checkpoint holds the generator and the fake score network.  Sampling: one network evaluation.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems
from models.base import FamilyConfig, LossOut, randn
from models.diffusion import flow_interpolate, flow_target, sample_t_logit_normal, sample_t_uniform
from models.flow import FlowConfig, FlowMatching
from models.reflow import _SAME, batch_pair_noise
from models.samplers import SampleResult
from models.teacher import TeacherError, TeacherMixin, same_fields


class DMDConfig(FlowConfig):
    teacher: str = Field("", description="Teacher checkpoint folder (a flow or reflow run)")
    real_guidance: float = Field(1.0, ge=0.0, le=50.0, description="CFG scale of the teacher (real) score; baked "
                                 "into the generator")
    regression_weight: float = Field(0.25, ge=0.0, le=100.0, description="Weight of the regression loss on the "
                                     "teacher pairs (paper: 0.25)")
    t_min: float = Field(0.02, ge=0.0, lt=1.0, description="Smallest re-noising time of the distribution matching")
    t_max: float = Field(0.98, gt=0.0, le=1.0, description="Largest re-noising time")

    def repa_problems(self, p: Problems) -> None:
        p.add("repa is a pre-training option; a DMD generator does not use it")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("t_min", "t_max") and self.t_min >= self.t_max:
            p.add(f"t_min {self.t_min} must be < t_max {self.t_max}")


class DMD(TeacherMixin, FlowMatching):
    name: ClassVar[str] = "dmd"
    Config: ClassVar[type[FamilyConfig]] = DMDConfig
    samplers: ClassVar[tuple[str, ...]] = ("onestep",)
    default_sampler: ClassVar[str] = "onestep"
    default_steps: ClassVar[int] = 1
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"onestep": ()}
    needs_meta: ClassVar[bool] = True

    cfg: DMDConfig

    def __init__(self, cfg: DMDConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        if c.real_guidance != 1.0 and c.conditioning == "none":
            raise TeacherError("real_guidance needs a conditional teacher (conditioning='none' here)")
        self.init_teacher(None, lambda t: same_fields(c, t.cfg, _SAME, "DMD"))
        self.fake_net = copy.deepcopy(self.net)  # the fake score starts as the teacher too

    def optimizers_spec(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": list(self.net.parameters()), "fake_score": list(self.fake_net.parameters())}

    def generate(self, z: Tensor, cond: dict[str, Tensor], net: Any = None) -> Tensor:
        """One Euler step from t = 1: x = z - v(z, 1)."""
        net = net if net is not None else (lambda x, t: self.net(x, t, cond))
        return z - net(z, torch.ones(z.shape[0], device=z.device, dtype=z.dtype))

    def _times(self, n: int, generator: torch.Generator | None, dev: torch.device) -> Tensor:
        g_dev = generator.device if generator is not None else dev
        if self.cfg.t_sampling == "uniform":
            return sample_t_uniform(n, generator, g_dev).to(dev)
        return sample_t_logit_normal(n, self.cfg.logit_mean, self.cfg.logit_std, generator, g_dev).to(dev)

    def _real_x0(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        v = self.teacher.net(x_t, t, cond)
        w = self.cfg.real_guidance
        if w != 1.0 and cond:
            v_u = self.teacher.net(x_t, t, self.null_condition(x_t.shape[0]))
            v = v_u + w * (v - v_u)
        return x_t - t.view(-1, 1, 1, 1) * v

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        c = self.cfg
        x_pair = self.check_images(batch)
        z_pair = batch_pair_noise(batch, x_pair, "DMD")
        cond = self.training_condition(batch, generator)
        B, dev, dt = x_pair.shape[0], x_pair.device, x_pair.dtype
        regression = F.mse_loss(self.generate(z_pair, cond).float(), x_pair.float())
        # distribution matching on fresh noise
        x = self.generate(randn(x_pair.shape, generator, dev, dt), cond)
        t = (c.t_min + (c.t_max - c.t_min) * sample_t_uniform(B, generator, generator.device if generator else dev)
             ).to(dev, dt)
        x_t = flow_interpolate(x.detach(), randn(x.shape, generator, dev, dt), t).to(dt)
        with torch.no_grad():
            x0_real = self._real_x0(x_t, t, cond).float()
            x0_fake = (x_t - t.view(-1, 1, 1, 1) * self.fake_net(x_t, t, cond)).float()
            scale = (x.detach().float() - x0_real).abs().flatten(1).mean(1).clamp_min(1e-6).view(-1, 1, 1, 1)
            grad = torch.nan_to_num((x0_fake - x0_real) / scale)
        dm = 0.5 * F.mse_loss(x.float(), x.detach().float() - grad)
        gen_loss = dm + c.regression_weight * regression
        # the fake score follows the generator's samples (flow matching on them)
        x_fake = x.detach()
        t_f = self._times(B, generator, dev).to(dt)
        eps = randn(x_fake.shape, generator, dev, dt)
        v_f = self.fake_net(flow_interpolate(x_fake, eps, t_f).to(dt), t_f, cond)
        fake_loss = F.mse_loss(v_f.float(), flow_target(x_fake, eps).float())
        return LossOut({"generator": gen_loss, "fake_score": fake_loss},
                       {"regression": float(regression.detach()), "dm": float(dm.detach()),
                        "dm_grad_norm": float(grad.flatten(1).norm(dim=1).mean()), "fake_loss": float(fake_loss.detach())})

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        if steps != 1:
            raise ValueError(f"DMD.sample: the generator takes exactly one step, got steps={steps}")
        return SampleResult(self.generate(x_T, {}, net_fn), 1)
