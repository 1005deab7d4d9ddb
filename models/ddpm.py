"""DDPM family (Ho et al. 2020): discrete T-step diffusion, eps-, x0- or v-prediction, sampled by
ancestral DDPM or DDIM (Song et al. 2021) on a respaced grid of training timesteps.  The MSE is
unweighted in the chosen target, or min-SNR-gamma weighted (Hang et al. 2023): per timestep
min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v,
SNR = ab / (1 - ab), i.e. the same x0-space weight min(SNR, gamma) whatever the target."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field
from torch import Tensor

from models.base import Family, FamilyConfig, LossOut, randn
from models.diffusion import alphas_cumprod, betas_cosine, betas_linear, pred_from_x0_eps, q_sample, respace
from models.samplers import SampleResult, ddim, ddpm_ancestral


class DDPMConfig(FamilyConfig):
    prediction: Literal["eps", "x0", "v"] = Field("eps", description="Network target: noise eps, clean image x0 or v "
                                                 "(Salimans & Ho 2022)")
    loss_weighting: Literal["none", "min_snr"] = Field("none", description="Per-timestep MSE weight: none, or "
                                                       "min-SNR-gamma (Hang et al. 2023)")
    min_snr_gamma: float = Field(5.0, gt=0.0, le=1000.0, description="gamma of min-SNR weighting (paper: 5)")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="Beta schedule: linear (Ho et al. 2020) or cosine (Nichol & Dhariwal 2021)"
    )
    timesteps: int = Field(1000, ge=2, le=100_000, description="Training timesteps T")
    spacing: Literal["leading", "trailing", "linspace"] = Field(
        "trailing", description="How sampling steps are picked among the T (trailing starts at t=T-1)"
    )
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity (0 deterministic, 1 = DDPM variance)")


class DDPM(Family):
    name: ClassVar[str] = "ddpm"
    Config: ClassVar[type[FamilyConfig]] = DDPMConfig
    samplers: ClassVar[tuple[str, ...]] = ("ddpm", "ddim")
    default_sampler: ClassVar[str] = "ddim"
    default_steps: ClassVar[int] = 50
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"ddpm": (), "ddim": ("eta",)}
    time_scale: ClassVar[float] = 1.0  # the net sees the integer timestep 0..T-1, as in ADM
    any_size: ClassVar[bool] = True  # trains on aspect-ratio buckets, samples at height=/width=

    cfg: DDPMConfig

    def __init__(self, cfg: DDPMConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.net = self.build_denoiser()
        T = self.cfg.timesteps
        betas = betas_linear(T) if self.cfg.schedule == "linear" else betas_cosine(T)
        # A plain float64 CPU tensor, not a buffer: module.to(dtype) must never round it.
        self.alphas_cumprod = alphas_cumprod(betas)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x0 = self.check_images(batch)
        cond = self.training_condition(batch, generator)
        B, dev = x0.shape[0], x0.device
        g_dev = generator.device if generator is not None else dev
        t = torch.randint(0, self.cfg.timesteps, (B,), generator=generator, device=g_dev).to(dev)
        eps = randn(x0.shape, generator, dev, x0.dtype)
        ab = self.alphas_cumprod[t.cpu()].to(dev)
        x_t = q_sample(x0, t, eps, self.alphas_cumprod)
        target = pred_from_x0_eps(x0, eps, ab, self.cfg.prediction)
        out = self.net(x_t, t, cond)
        per = ((out.float() - target.float()) ** 2).flatten(1).mean(1)
        if self.cfg.loss_weighting == "min_snr":
            per = per * min_snr_weight(ab, self.cfg.min_snr_gamma, self.cfg.prediction).to(per)
        loss = per.mean()
        return LossOut({"model": loss}, {"loss": float(loss.detach())})

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        ab = self.alphas_cumprod
        ts = respace(ab, steps, self.cfg.spacing)
        clip = 1.0 if self.cfg.data == "pixels" else None
        pred = self.cfg.prediction
        if sampler == "ddpm":
            return ddpm_ancestral(net_fn, x_T, ab, ts, pred=pred, generator=generator, clip_denoised=clip)
        eta = float(options.get("eta", self.cfg.eta))
        return ddim(net_fn, x_T, ab, ts, eta=eta, pred=pred, generator=generator, clip_denoised=clip)


def min_snr_weight(ab: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, Sec. 3.4) of each sample's MSE in ``prediction``
    space at alpha-bar ``ab``: min(SNR, gamma) in x0 space, divided by the factor relating the
    target's squared error to x0's (SNR for eps, SNR + 1 for v)."""
    snr = ab.double() / (1 - ab.double())
    w = snr.clamp(max=gamma)
    return {"eps": w / snr, "x0": w, "v": w / (snr + 1)}[prediction].float()
