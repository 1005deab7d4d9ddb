"""EDM family (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), ln sigma ~ N(P_mean, P_std^2),
loss lambda(sigma) |D - x0|^2, sampled by Heun (optional churn), Euler or DPM-Solver++(2M) on
the Karras sigma grid."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from pydantic import Field
from torch import Tensor

from imagegen.checks import Problems
from models.base import Family, FamilyConfig, LossOut, randn
from models.diffusion import edm_denoiser, edm_network_io, edm_precond, karras_sigmas, sample_sigma_lognormal
from models.samplers import SampleResult, dpmpp_2m, edm_euler, edm_heun


class EDMConfig(FamilyConfig):
    sigma_data: float = Field(0.5, gt=0.0, le=10.0, description="Data standard deviation (0.5 for [-1,1] images)")
    p_mean: float = Field(-1.2, ge=-10.0, le=10.0, description="Mean of ln(sigma) at training")
    p_std: float = Field(1.2, gt=0.0, le=10.0, description="Std of ln(sigma) at training")
    sigma_min: float = Field(0.002, gt=0.0, description="Smallest sampling sigma")
    sigma_max: float = Field(80.0, gt=0.0, le=1e4, description="Largest sampling sigma (start noise scale)")
    rho: float = Field(7.0, gt=0.0, le=100.0, description="Karras grid exponent")
    s_churn: float = Field(0.0, ge=0.0, description="Heun/Euler churn (0 = deterministic)")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("sigma_min", "sigma_max") and self.sigma_min >= self.sigma_max:
            p.add(f"sigma_min {self.sigma_min} must be < sigma_max {self.sigma_max}")


_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")


class EDM(Family):
    name: ClassVar[str] = "edm"
    Config: ClassVar[type[FamilyConfig]] = EDMConfig
    samplers: ClassVar[tuple[str, ...]] = ("heun", "euler", "dpmpp_2m")
    default_sampler: ClassVar[str] = "heun"
    default_steps: ClassVar[int] = 18  # EDM's CIFAR-10 setting: 35 NFE with Heun
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"heun": _CHURN, "euler": _CHURN, "dpmpp_2m": ()}
    # c_noise = ln(sigma)/4 goes straight into the positional embedding, as in EDM's released code.
    time_scale: ClassVar[float] = 1.0
    any_size: ClassVar[bool] = True  # trains on aspect-ratio buckets, samples at height=/width=

    cfg: EDMConfig

    def __init__(self, cfg: EDMConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.net = self.build_denoiser()

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        """Unit-weight MSE on F's effective target == lambda(sigma)-weighted MSE on D (EDM eq. 8)."""
        x0 = self.check_images(batch)
        cond = self.training_condition(batch, generator)
        B, dev = x0.shape[0], x0.device
        g_dev = generator.device if generator is not None else dev
        sigma = sample_sigma_lognormal(B, self.cfg.p_mean, self.cfg.p_std, generator, g_dev).to(dev)
        noise = randn(x0.shape, generator, dev, x0.dtype)
        x_in, target = edm_network_io(x0, noise, sigma, self.cfg.sigma_data)
        c_noise = edm_precond(sigma, self.cfg.sigma_data)[3]
        out = self.net(x_in, c_noise.to(x0.dtype), cond)
        loss = ((out.float() - target.float()) ** 2).mean()
        return LossOut({"model": loss}, {"loss": float(loss.detach())})

    def denoiser(self, net_fn: Any) -> Any:
        """D(x, sigma) from a (conditioned, possibly guided) raw-net function F(x_in, c_noise)."""
        return edm_denoiser(net_fn, self.cfg.sigma_data)

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        c = self.cfg
        sigmas = karras_sigmas(steps, c.sigma_min, c.sigma_max, c.rho)
        D = self.denoiser(net_fn)
        x = x_T * c.sigma_max
        if sampler == "dpmpp_2m":
            return dpmpp_2m(D, x, sigmas)
        churn = {"s_churn": c.s_churn, **options}
        walk = edm_heun if sampler == "heun" else edm_euler
        return walk(D, x, sigmas, generator=generator, **churn)
