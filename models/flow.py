"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): linear path
x_t = (1 - t) x0 + t eps, velocity target eps - x0, t ~ U(0,1) or logit-normal (Esser et al.
2024), sampled by Euler or Heun from t = 1 (noise) to t = 0.  DiT by default (SD3-style)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from models.base import Family, FamilyConfig, LossOut, randn
from models.diffusion import flow_interpolate, flow_target, sample_t_logit_normal, sample_t_uniform
from models.samplers import SampleResult, flow_euler, flow_heun, flow_timesteps


class FlowConfig(FamilyConfig):
    net: Literal["unet", "dit", "mmdit"] = Field("dit", description="Denoiser architecture (DiT by default; mmdit: "
                                                "SD3's joint attention over caption tokens and image patches)")
    t_sampling: Literal["uniform", "logit_normal"] = Field(
        "logit_normal", description="Training time distribution (logit-normal: SD3, Esser et al. 2024 eq. 19)"
    )
    logit_mean: float = Field(0.0, ge=-5.0, le=5.0, description="Logit-normal location m")
    logit_std: float = Field(1.0, gt=0.0, le=5.0, description="Logit-normal scale s")
    shift: float = Field(1.0, gt=0.0, le=100.0, description="Sampling timestep shift (SD3 Sec. 5.3.2); 1 = uniform")


class FlowMatching(Family):
    name: ClassVar[str] = "flow"
    Config: ClassVar[type[FamilyConfig]] = FlowConfig
    samplers: ClassVar[tuple[str, ...]] = ("euler", "heun")
    default_sampler: ClassVar[str] = "euler"
    default_steps: ClassVar[int] = 50
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"euler": ("shift",), "heun": ("shift",)}
    time_scale: ClassVar[float] = 1000.0  # t in [0, 1] -> the embedding sees 0..1000, as in SD3

    cfg: FlowConfig

    def __init__(self, cfg: FlowConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.net = self.build_denoiser()

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x0 = self.check_images(batch)
        return self.velocity_loss(x0, self.training_condition(batch, generator), generator)

    def velocity_loss(self, x0: Tensor, cond: dict[str, Tensor], generator: torch.Generator | None,
                      eps: Tensor | None = None) -> LossOut:
        """MSE of the velocity eps - x0 at x_t = (1 - t) x0 + t eps, t from ``t_sampling``;
        ``eps`` defaults to fresh Gaussian noise (drawn after t); reflow passes its paired noise."""
        B, dev = x0.shape[0], x0.device
        g_dev = generator.device if generator is not None else dev
        if self.cfg.t_sampling == "uniform":
            t = sample_t_uniform(B, generator, g_dev)
        else:
            t = sample_t_logit_normal(B, self.cfg.logit_mean, self.cfg.logit_std, generator, g_dev)
        t = t.to(dev)
        if eps is None:
            eps = randn(x0.shape, generator, dev, x0.dtype)
        x_t = flow_interpolate(x0, eps, t)
        out = self.net(x_t, t.to(x0.dtype), cond)
        loss = F.mse_loss(out.float(), flow_target(x0, eps).float())
        return LossOut({"model": loss}, {"loss": float(loss.detach())})

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        ts = flow_timesteps(steps, float(options.get("shift", self.cfg.shift)))
        walk = flow_euler if sampler == "euler" else flow_heun
        return walk(net_fn, x_T, ts)
