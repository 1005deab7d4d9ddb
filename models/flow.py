"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): linear path
x_t = (1 - t) x0 + t eps, velocity target eps - x0, t ~ U(0,1) or logit-normal (Esser et al.
2024), optionally shifted towards noise (``train_shift``, SD3 Sec. 5.3.2), sampled by Euler or
Heun from t = 1 (noise) to t = 0.  DiT by default (SD3-style), or MMDiT (joint attention over
caption tokens); optional REPA alignment of a block's tokens to a frozen encoder (models/repa.py)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from imagegen.checks import Problems
from models.base import Family, FamilyConfig, LossOut, randn
from models.diffusion import flow_interpolate, flow_target, sample_t_logit_normal, sample_t_uniform
from models.repa import REPA, RepaConfig, check_repa
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
    train_shift: float = Field(1.0, gt=0.0, le=100.0, description="Training timestep shift t' = s t / (1 + (s - 1) t) "
                               "of the sampled t (SD3 Sec. 5.3.2: > 1 puts more weight on noisy t); 1 = none")
    repa: RepaConfig | None = Field(None, description="REPA: align a DiT/MMDiT block's tokens to a frozen vision "
                                    "encoder's patch features (Yu et al. 2024); None = off")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if self.repa is not None and p.can("repa"):
            self.repa_problems(p)

    def repa_problems(self, p: Problems) -> None:
        """The REPA settings against the network (its depth needs a valid net config)."""
        if not p.can("net"):
            return
        if self.net not in ("dit", "mmdit"):
            depth = 0
        else:
            try:  # a net config that does not build is reported by the base check
                depth = getattr(self.net_config(8, 1.0), "depth", 0) if not p.bad else None
            except ValueError:
                depth = None
        if depth is not None:
            try:
                check_repa(self.repa, self.net, depth, type(self).__name__)
            except ValueError as exc:
                p.add(str(exc).removeprefix(f"{type(self).__name__}: "))


class FlowMatching(Family):
    name: ClassVar[str] = "flow"
    Config: ClassVar[type[FamilyConfig]] = FlowConfig
    samplers: ClassVar[tuple[str, ...]] = ("euler", "heun")
    default_sampler: ClassVar[str] = "euler"
    default_steps: ClassVar[int] = 50
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"euler": ("shift",), "heun": ("shift",)}
    time_scale: ClassVar[float] = 1000.0  # t in [0, 1] -> the embedding sees 0..1000, as in SD3
    any_size: ClassVar[bool] = True  # trains on aspect-ratio buckets, samples at height=/width=

    cfg: FlowConfig

    def __init__(self, cfg: FlowConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.net = self.build_denoiser()
        if self.cfg.repa is not None:
            from models.teacher import loading_for_inference

            self.repa = REPA(self.cfg.repa, self.net, load_encoder=not loading_for_inference())

    def size_multiple(self) -> int | None:
        # REPA aligns to the encoder's square patch grid: the configured square size only
        return None if self.cfg.repa is not None else super().size_multiple()

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
        if self.cfg.train_shift != 1.0:
            s = self.cfg.train_shift
            t = s * t / (1 + (s - 1) * t)
        t = t.to(dev)
        if eps is None:
            eps = randn(x0.shape, generator, dev, x0.dtype)
        x_t = flow_interpolate(x0, eps, t)
        out = self.net(x_t, t.to(x0.dtype), cond)
        loss = F.mse_loss(out.float(), flow_target(x0, eps).float())
        logs = {"loss": float(loss.detach())}
        if self.cfg.repa is not None:
            images = x0 if self.cfg.data == "pixels" else self.decode_latents(x0)
            align = self.repa.loss(images)
            logs["repa_cos"] = -float(align.detach())
            loss = loss + self.cfg.repa.weight * align
        return LossOut({"model": loss}, logs)

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        ts = flow_timesteps(steps, float(options.get("shift", self.cfg.shift)))
        walk = flow_euler if sampler == "euler" else flow_heun
        return walk(net_fn, x_T, ts)
