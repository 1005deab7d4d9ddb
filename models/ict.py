"""Consistency training without a teacher, with the improved recipe of Song & Dhariwal 2023
("Improved Techniques for Training Consistency Models", iCT).

The consistency function f(x, sigma) is the one of consistency distillation (models/consistency.py:
EDM's network with the boundary condition f(x, sigma_min) = x).  Instead of a teacher's ODE step,
adjacent points of one noise draw are paired: on the Karras grid sigma_1 < ... < sigma_N,

    x_hi = x0 + sigma_{i+1} z,   x_lo = x0 + sigma_i z,
    L = lambda(sigma_i) d(f_theta(x_hi, sigma_{i+1}), sg(f_theta(x_lo, sigma_i))),  lambda = 1 / (sigma_{i+1} - sigma_i)

with the iCT choices: the target is the student itself under stop-gradient (no EMA target
network); d is the pseudo-Huber metric (c = 0.00054 sqrt(d)); the pair index i is drawn from the
discretised lognormal p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean)
/ (sqrt 2 P_std)), P_mean = -1.1, P_std = 2.0; and N follows the exponential curriculum
N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)), s0 = 10, s1 = 1280,
K = ``curriculum_steps`` (set it to the run's steps).  The step counter k lives in the state_dict
(``after_step``), so a resumed run continues the curriculum exactly.  Sampling: 1-4 step
consistency sampling, as for the distilled student.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field
from torch import Tensor

from imagegen.checks import Problems
from models.base import FamilyConfig, LossOut, rand, randn
from models.consistency import ConsistencyFunction
from models.diffusion import expand_to, karras_sigmas
from models.edm import EDM, EDMConfig


class ICTConfig(EDMConfig):
    p_mean: float = Field(-1.1, ge=-10.0, le=10.0, description="Mean of ln(sigma) of the pair sampling (iCT: -1.1)")
    p_std: float = Field(2.0, gt=0.0, le=10.0, description="Std of ln(sigma) of the pair sampling (iCT: 2.0)")
    s0: int = Field(10, ge=1, le=100_000, description="Discretisation steps at the start of the curriculum")
    s1: int = Field(1280, ge=1, le=100_000, description="Discretisation steps at its end")
    curriculum_steps: int = Field(400_000, ge=1, description="K: training steps the curriculum spans (the run's "
                                  "steps); N stays at s1 + 1 after it")
    distance: Literal["l2", "pseudo_huber"] = Field("pseudo_huber", description="Consistency loss metric")
    sample_steps: int = Field(1, ge=1, le=16, description="Default consistency sampling steps")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("s0", "s1") and self.s1 < self.s0:
            p.add(f"s1={self.s1} must be >= s0={self.s0}")


def discretisation(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) of the iCT curriculum: s0 + 1 levels, doubling every K' steps up to s1 + 1."""
    k_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / max(k_prime, 1)), s1) + 1


def pair_probabilities(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """p(i) of the pair (sigma_i, sigma_{i+1}) under the discretised lognormal (ascending sigmas)."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return p / p.sum()


class ConsistencyTraining(ConsistencyFunction, EDM):
    name: ClassVar[str] = "ict"
    Config: ClassVar[type[FamilyConfig]] = ICTConfig
    samplers: ClassVar[tuple[str, ...]] = ("consistency",)
    default_sampler: ClassVar[str] = "consistency"
    default_steps: ClassVar[int] = 1
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"consistency": ()}

    cfg: ICTConfig

    def __init__(self, cfg: ICTConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.default_steps = self.cfg.sample_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps_done += 1

    def sigmas(self, n: int) -> Tensor:
        """The n Karras levels, ascending (sigma_1 = sigma_min ... sigma_n = sigma_max), float64."""
        c = self.cfg
        return karras_sigmas(n, c.sigma_min, c.sigma_max, c.rho)[:-1].flip(0)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        c = self.cfg
        x0 = self.check_images(batch)
        cond = self.training_condition(batch, generator)
        B, dev = x0.shape[0], x0.device
        n = discretisation(int(self.steps_done), c.curriculum_steps, c.s0, c.s1)
        sig = self.sigmas(n)
        cdf = pair_probabilities(sig, c.p_mean, c.p_std).cumsum(0)
        u = rand(B, generator, dev).double().cpu()
        i = torch.searchsorted(cdf, u * cdf[-1]).clamp_max(n - 2)
        s_lo, s_hi = sig[i], sig[i + 1]
        z = randn(x0.shape, generator, dev, x0.dtype)
        x_hi = x0 + expand_to(s_hi.to(dev), x0) * z
        x_lo = x0 + expand_to(s_lo.to(dev), x0) * z

        def f(x: Tensor, s: Tensor) -> Tensor:
            return self.consistency(lambda xi, noise: self.net(xi, noise, cond), x, s.to(dev))

        with torch.no_grad():
            target = f(x_lo, s_lo)
        weight = (1.0 / (s_hi - s_lo)).float().to(dev)
        loss = (weight * self.distance(f(x_hi, s_hi), target)).mean()
        return LossOut({"model": loss}, {"loss": float(loss.detach()), "levels": float(n)})
