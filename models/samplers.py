"""Stateless samplers: functions of (model, x, schedule, ...) -> SampleResult.

No scheduler objects: the schedule (alphas_cumprod + timesteps, or a sigma / t grid) is an
argument, so any family whose network follows one of the call conventions in
models/diffusion.py can use any matching sampler, and a sampler run is reproducible from its
arguments and the generator seed alone.

Call conventions (see models/diffusion.py):
  discrete  model(x_t, t_long(B,), **cond)   -> eps | x0 | v    (ddpm_ancestral, ddim, ddim_invert)
  EDM       denoiser(x, sigma(B,), **cond)   -> x0_hat          (edm_euler, edm_heun, dpmpp_2m)
  flow      velocity(x, t(B,), **cond)       -> eps - x0 hat    (flow_euler, flow_heun)

Every sampler returns a SampleResult with the final sample, the number of network evaluations
(NFE; one call of the model/denoiser counts as one, so a CFG-wrapped model counts 1 per call
even though it runs a doubled batch) and, when return_trajectory=True, the list of states
[x_start, x_1, ..., x_final] at the grid points (Heun's intermediate Euler guesses excluded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from models.diffusion import (
    Denoiser,
    DiscreteModel,
    Pred,
    VelocityModel,
    _check_pred,
    expand_to,
    x0_eps_from_pred,
)

Variance = Literal["beta_tilde", "beta"]


@dataclass
class SampleResult:
    """Final sample, network evaluations used, and optionally the visited states."""

    sample: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None


class _Counter:
    """Counts calls so every sampler reports NFE the same way."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.n = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.n += 1
        return self.fn(*args, **kwargs)


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # Same draw as diffusers' randn_tensor on CPU: torch.randn(shape, generator, dtype) — this
    # keeps seeded runs comparable with diffusers pipelines step for step.
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------- discrete grids


def _check_discrete(alphas_cumprod: Tensor, timesteps: Tensor, x: Tensor, where: str) -> tuple[Tensor, list[int]]:
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    if ab.ndim != 1 or ab.numel() == 0 or (ab <= 0).any() or (ab > 1).any():
        raise ValueError(f"{where}: alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1]")
    ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if not ts:
        raise ValueError(f"{where}: timesteps is empty")
    if any(t < 0 or t >= ab.numel() for t in ts):
        raise ValueError(f"{where}: timesteps must lie in [0, {ab.numel() - 1}], got {ts}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{where}: timesteps must be strictly decreasing (noisy -> clean), got {ts}")
    if x.ndim < 1:
        raise ValueError(f"{where}: x must have a batch dimension, got shape {tuple(x.shape)}")
    return ab, ts


def ddpm_step(
    x_t: Tensor,
    model_out: Tensor,
    ab_t: float | Tensor,
    ab_prev: float | Tensor,
    pred: Pred = "eps",
    noise: Tensor | None = None,
    variance: Variance = "beta_tilde",
    clip_denoised: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral step x_t -> x_prev of Ho et al. 2020 (eq. 6-7) between any two grid levels.

    With alpha = ab_t / ab_prev and beta = 1 - alpha (the respaced step's beta):
      mean = sqrt(ab_prev) beta / (1 - ab_t) x0_hat + sqrt(alpha) (1 - ab_prev) / (1 - ab_t) x_t
      var  = beta_tilde = (1 - ab_prev) / (1 - ab_t) beta   (variance="beta_tilde", default)
             or beta                                          (variance="beta")
    Returns (x_prev, x0_hat); noise=None gives the mean (used for the last step).
    """
    _check_pred(pred, "ddpm_step")
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"ddpm_step: variance must be 'beta_tilde' or 'beta', got {variance!r}")
    a_t = expand_to(torch.as_tensor(ab_t, dtype=torch.float64), x_t)
    a_p = expand_to(torch.as_tensor(ab_prev, dtype=torch.float64), x_t)
    x0, _ = x0_eps_from_pred(model_out, x_t, a_t, pred)
    if clip_denoised is not None:
        x0 = x0.clamp(-clip_denoised, clip_denoised)
    alpha = a_t / a_p
    beta = 1 - alpha
    mean = a_p.sqrt() * beta / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_p) / (1 - a_t) * x_t
    if noise is None:
        return mean, x0
    var = (1 - a_p) / (1 - a_t) * beta if variance == "beta_tilde" else beta
    return mean + var.sqrt() * noise, x0


def ddim_step(
    x_t: Tensor,
    model_out: Tensor,
    ab_t: float | Tensor,
    ab_prev: float | Tensor,
    eta: float = 0.0,
    pred: Pred = "eps",
    noise: Tensor | None = None,
    clip_denoised: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One generalized DDIM step (Song et al. 2021, eq. 12 and 16).

    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma noise
    eta=0 is deterministic; eta=1 has DDPM's posterior variance.  With clip_denoised the x0_hat
    is clipped but eps_hat is kept (diffusers' default use_clipped_model_output=False).
    Returns (x_prev, x0_hat).
    """
    _check_pred(pred, "ddim_step")
    if eta < 0:
        raise ValueError(f"ddim_step: eta must be >= 0, got {eta}")
    a_t = expand_to(torch.as_tensor(ab_t, dtype=torch.float64), x_t)
    a_p = expand_to(torch.as_tensor(ab_prev, dtype=torch.float64), x_t)
    x0, eps = x0_eps_from_pred(model_out, x_t, a_t, pred)
    if clip_denoised is not None:
        x0 = x0.clamp(-clip_denoised, clip_denoised)
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    x_prev = a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddpm_ancestral(
    model: DiscreteModel,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    pred: Pred = "eps",
    generator: torch.Generator | None = None,
    variance: Variance = "beta_tilde",
    clip_denoised: float | None = None,
    final_alpha_cumprod: float = 1.0,
    cond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) on a possibly respaced grid.

    Steps timesteps[i] -> timesteps[i+1], the last one to ``final_alpha_cumprod`` (1 = clean
    data).  Fresh noise on every step but the last (Ho et al.: z = 0 at t = 1).  Respaced
    betas are 1 - ab_t / ab_prev (Nichol & Dhariwal 2021, Sec. 4).
    Note: diffusers' DDPMScheduler also adds noise on the last step when that timestep is > 0
    ("trailing"/"linspace" spacings); with beta_tilde that noise has variance 0 anyway.
    """
    ab, ts = _check_discrete(alphas_cumprod, timesteps, x_T, "ddpm_ancestral")
    _check_pred(pred, "ddpm_ancestral")
    f = _Counter(model)
    cond = cond or {}
    x = x_T
    traj = [x] if return_trajectory else None
    B = x.shape[0]
    for i, t in enumerate(ts):
        last = i + 1 == len(ts)
        ab_prev = final_alpha_cumprod if last else float(ab[ts[i + 1]])
        out = f(x, torch.full((B,), t, dtype=torch.long, device=x.device), **cond)
        noise = None if last else _randn(x, generator)
        x, _ = ddpm_step(x, out, float(ab[t]), ab_prev, pred, noise, variance, clip_denoised)
        if traj is not None:
            traj.append(x)
    return SampleResult(x, f.n, traj)


def ddim(
    model: DiscreteModel,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    eta: float = 0.0,
    pred: Pred = "eps",
    generator: torch.Generator | None = None,
    clip_denoised: float | None = None,
    final_alpha_cumprod: float = 1.0,
    cond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models").

    Steps timesteps[i] -> timesteps[i+1] (always the next listed timestep), the last one to
    ``final_alpha_cumprod`` (diffusers' set_alpha_to_one=True is 1.0).  eta=0 is deterministic;
    eta>0 draws noise from ``generator`` on every step in the same order as diffusers.
    Note: diffusers' DDIMScheduler steps to t - T // n instead of the next listed timestep,
    which differs for "linspace" and for "trailing" when T % n != 0.
    """
    ab, ts = _check_discrete(alphas_cumprod, timesteps, x_T, "ddim")
    _check_pred(pred, "ddim")
    if eta < 0:
        raise ValueError(f"ddim: eta must be >= 0, got {eta}")
    f = _Counter(model)
    cond = cond or {}
    x = x_T
    traj = [x] if return_trajectory else None
    B = x.shape[0]
    for i, t in enumerate(ts):
        ab_prev = final_alpha_cumprod if i + 1 == len(ts) else float(ab[ts[i + 1]])
        out = f(x, torch.full((B,), t, dtype=torch.long, device=x.device), **cond)
        noise = _randn(x, generator) if eta > 0 else None
        x, _ = ddim_step(x, out, float(ab[t]), ab_prev, eta, pred, noise, clip_denoised)
        if traj is not None:
            traj.append(x)
    return SampleResult(x, f.n, traj)


def ddim_invert(
    model: DiscreteModel,
    x0: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    pred: Pred = "eps",
    fixed_point_iters: int = 0,
    cond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Deterministic DDIM encoding x0 -> x_T (Song et al. 2021, Sec. 4.3; eq. 13 run backwards).

    ``timesteps`` is the same descending list ``ddim`` would use; the inversion walks it in
    reverse: clean -> timesteps[-1] -> ... -> timesteps[0].  Each step from level lo to hi uses
    the model at the lower point (explicit Euler in the reverse direction):
      x_hi = sqrt(ab_hi) (x_lo - sqrt(1 - ab_lo) eps_hat) / sqrt(ab_lo) + sqrt(1 - ab_hi) eps_hat
    The first step starts at clean data (ab = 1), where no timestep exists; the model is
    queried there at timesteps[-1] (the usual practice).  ddim(eta=0) on the result gives x0
    back up to the O(step) discretisation error of both Euler walks.

    fixed_point_iters=k > 0 refines each step by k fixed-point iterations that re-evaluate eps at
    the *upper* point, x_hi <- DDIM-step-inverse(x_lo, eps(x_hi, t_hi)), i.e. solve the implicit
    equation whose solution ddim(eta=0) maps back to x_lo exactly (the fixed-point inversion of
    Pan et al. 2023, "Effective Real Image Editing with Accelerated Iterative Diffusion
    Inversion").  NFE = len(timesteps) * (1 + k).
    """
    ab, ts = _check_discrete(alphas_cumprod, timesteps, x0, "ddim_invert")
    _check_pred(pred, "ddim_invert")
    if not isinstance(fixed_point_iters, int) or fixed_point_iters < 0:
        raise ValueError(f"ddim_invert: fixed_point_iters must be an int >= 0, got {fixed_point_iters!r}")
    f = _Counter(model)
    cond = cond or {}
    x = x0
    traj = [x] if return_trajectory else None
    B = x.shape[0]
    up = ts[::-1]
    ab_lo = 1.0
    t_eval = up[0]
    for t_hi in up:
        out = f(x, torch.full((B,), t_eval, dtype=torch.long, device=x.device), **cond)
        _, eps = x0_eps_from_pred(out, x, float(ab[t_eval]), pred)
        x0_hat = (x - math.sqrt(1 - ab_lo) * eps) / math.sqrt(ab_lo)
        ab_hi = float(ab[t_hi])
        x_lo = x
        x = math.sqrt(ab_hi) * x0_hat + math.sqrt(1 - ab_hi) * eps
        t_hi_vec = torch.full((B,), t_hi, dtype=torch.long, device=x.device)
        for _ in range(fixed_point_iters):
            _, eps = x0_eps_from_pred(f(x, t_hi_vec, **cond), x, ab_hi, pred)
            x0_hat = (x_lo - math.sqrt(1 - ab_lo) * eps) / math.sqrt(ab_lo)
            x = math.sqrt(ab_hi) * x0_hat + math.sqrt(1 - ab_hi) * eps
        ab_lo, t_eval = ab_hi, t_hi
        if traj is not None:
            traj.append(x)
    return SampleResult(x, f.n, traj)


# ----------------------------------------------------------------------------- EDM (sigma) samplers


def _check_sigmas(sigmas: Tensor, x: Tensor, where: str) -> Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"{where}: sigmas must be 1-D with at least 2 values, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"{where}: sigmas must be finite and >= 0")
    if (s[1:] >= s[:-1]).any():
        raise ValueError(f"{where}: sigmas must be strictly decreasing, got {s.tolist()}")
    if x.ndim < 1:
        raise ValueError(f"{where}: x must have a batch dimension, got shape {tuple(x.shape)}")
    return s


def _sig(v: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), v, dtype=x.dtype, device=x.device)


def _edm_walk(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    heun: bool,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    generator: torch.Generator | None,
    cond: dict[str, Any] | None,
    return_trajectory: bool,
    where: str,
) -> SampleResult:
    s = _check_sigmas(sigmas, x, where)
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"{where}: s_churn and s_noise must be >= 0")
    D = _Counter(denoiser)
    cond = cond or {}
    n = s.numel() - 1
    traj = [x] if return_trajectory else None
    for i in range(n):
        sc, sn = float(s[i]), float(s[i + 1])
        if sc == 0:
            raise ValueError(f"{where}: only the last sigma may be 0")
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sc <= s_tmax else 0.0
        s_hat = sc * (1 + gamma)
        if gamma > 0:  # churn: raise the noise level to s_hat with fresh noise (Alg. 2 lines 5-6)
            x = x + math.sqrt(s_hat**2 - sc**2) * s_noise * _randn(x, generator)
        d = (x - D(x, _sig(s_hat, x), **cond)) / s_hat
        x_next = x + (sn - s_hat) * d
        if heun and sn > 0:  # 2nd-order correction (Alg. 2 lines 9-11), skipped when sigma_next = 0
            d2 = (x_next - D(x_next, _sig(sn, x), **cond)) / sn
            x_next = x + (sn - s_hat) * 0.5 * (d + d2)
        x = x_next
        if traj is not None:
            traj.append(x)
    return SampleResult(x, D.n, traj)


def edm_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    cond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Euler on the EDM probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
    (Karras et al. 2022, Algorithm 2 without the correction), optional churn.

    ``x`` is the starting state at sigmas[0], i.e. already scaled (e.g. sigma_max * randn).
    NFE = len(sigmas) - 1.
    """
    return _edm_walk(denoiser, x, sigmas, False, s_churn, s_tmin, s_tmax, s_noise, generator, cond,
                     return_trajectory, "edm_euler")


def edm_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    cond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Heun's 2nd-order sampler, Karras et al. 2022 Algorithm 2 (deterministic when s_churn=0).

    gamma_i = min(s_churn / N, sqrt(2) - 1) for sigma_i in [s_tmin, s_tmax]; the last step to
    sigma = 0 is a plain Euler step, so NFE = 2 N - 1 for a grid ending in 0.
    """
    return _edm_walk(denoiser, x, sigmas, True, s_churn, s_tmin, s_tmax, s_noise, generator, cond,
                     return_trajectory, "edm_heun")


def dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) in the sigma form.

    With lambda = -log(sigma) and h = lambda_next - lambda (alpha = 1, variance exploding):
      x_next = (sigma_next / sigma) x - expm1(-h) D_i'
    where D_i' = D_i on the first step (and the last step to sigma = 0), otherwise the
    multistep extrapolation D_i' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i.
    One denoiser call per step: NFE = len(sigmas) - 1.
    """
    s = _check_sigmas(sigmas, x, "dpmpp_2m")
    D = _Counter(denoiser)
    cond = cond or {}
    traj = [x] if return_trajectory else None
    old: Tensor | None = None
    h_last = 0.0
    for i in range(s.numel() - 1):
        sc, sn = float(s[i]), float(s[i + 1])
        if sc == 0:
            raise ValueError("dpmpp_2m: only the last sigma may be 0")
        den = D(x, _sig(sc, x), **cond)
        if sn == 0:
            x = den  # limit h -> inf of the update: the data prediction itself
        else:
            h = math.log(sc) - math.log(sn)
            if old is None:
                d = den
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (sn / sc) * x - math.expm1(-h) * d
            h_last = h
        old = den
        if traj is not None:
            traj.append(x)
    return SampleResult(x, D.n, traj)


# ----------------------------------------------------------------------------- flow samplers


def flow_timesteps(n: int, shift: float = 1.0) -> Tensor:
    """n + 1 times from 1 to 0: uniform, optionally warped t' = shift t / (1 + (shift - 1) t)
    (the resolution-dependent timestep shift of Esser et al. 2024, SD3 Sec. 5.3.2)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"flow_timesteps: n must be a positive int, got {n!r}")
    if shift <= 0:
        raise ValueError(f"flow_timesteps: shift must be > 0, got {shift}")
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def _check_ts(ts: Tensor, x: Tensor, where: str) -> Tensor:
    t = torch.as_tensor(ts, dtype=torch.float64).cpu()
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"{where}: ts must be 1-D with at least 2 values, got shape {tuple(t.shape)}")
    if (t < 0).any() or (t > 1).any() or (t[1:] >= t[:-1]).any():
        raise ValueError(f"{where}: ts must be strictly decreasing within [0, 1] (1 = noise), got {t.tolist()}")
    if x.ndim < 1:
        raise ValueError(f"{where}: x must have a batch dimension, got shape {tuple(x.shape)}")
    return t


def _flow_walk(
    velocity: VelocityModel, x1: Tensor, ts: Tensor, heun: bool, cond: dict[str, Any] | None,
    return_trajectory: bool, where: str,
) -> SampleResult:
    t = _check_ts(ts, x1, where)
    v = _Counter(velocity)
    cond = cond or {}
    x = x1
    traj = [x] if return_trajectory else None
    for i in range(t.numel() - 1):
        tc, tn = float(t[i]), float(t[i + 1])
        d = v(x, _sig(tc, x), **cond)
        x_next = x + (tn - tc) * d
        if heun:
            d2 = v(x_next, _sig(tn, x), **cond)
            x_next = x + (tn - tc) * 0.5 * (d + d2)
        x = x_next
        if traj is not None:
            traj.append(x)
    return SampleResult(x, v.n, traj)


def flow_euler(
    velocity: VelocityModel, x1: Tensor, ts: Tensor, cond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Euler integration of dx/dt = v(x, t) from ts[0] (noise, usually 1) down to ts[-1] (data,
    usually 0) on the linear path (Liu et al. 2023, "Flow Straight and Fast").  NFE = len(ts) - 1.
    Equivalent to edm_euler on sigma = t / (1 - t) through diffusion.flow_to_edm."""
    return _flow_walk(velocity, x1, ts, False, cond, return_trajectory, "flow_euler")


def flow_heun(
    velocity: VelocityModel, x1: Tensor, ts: Tensor, cond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Heun (explicit trapezoid) integration of the flow ODE from ts[0] to ts[-1].

    The velocity is finite at t = 0 on the linear path, so unlike edm_heun the last step is
    corrected too: NFE = 2 (len(ts) - 1).
    """
    return _flow_walk(velocity, x1, ts, True, cond, return_trajectory, "flow_heun")
