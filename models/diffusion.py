"""Diffusion and flow-matching math shared by every model family (DDPM/DDIM, EDM, flow matching).

Everything here is a plain function of tensors so that families, samplers and tests use one
definition of each formula.  Schedules are built in float64: alpha-bar is a cumulative product
over up to thousands of steps and float32 loses the tail (1 - alpha_bar near 1) that the
low-noise end of sampling depends on.

Conventions
-----------
Discrete DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps,   ab_t = prod_{s<=t} (1 - beta_s),  t = 0..T-1
    (0-based t, as in diffusers: t=0 is the first, least noisy step).
    Predictions: "eps", "x0", "v" with v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022,
    "Progressive Distillation", Appendix D).

EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
    x = x0 + sigma n.  The DDPM x_t is the same point scaled: x_t = sqrt(ab) * x with
    sigma = sqrt((1 - ab) / ab).

Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023), linear path:
    x_t = (1 - t) x0 + t eps,  t in [0, 1] (t=0 data, t=1 noise), velocity u = eps - x0.
    The same point in EDM terms: x_t = (1 - t) * x with sigma = t / (1 - t).

Denoiser convention (what samplers call)
----------------------------------------
* EDM samplers call ``denoiser(x, sigma, **cond) -> x0_hat`` ("D(x; sigma)"): ``x`` is in the
  unscaled variance-exploding space x0 + sigma n, ``sigma`` is a tensor of shape (B,).
* Flow samplers call ``velocity(x, t, **cond) -> u_hat`` with ``t`` a float tensor of shape (B,).
* Discrete DDPM/DDIM samplers call ``model(x_t, t, **cond)`` with ``t`` a long tensor of shape
  (B,) holding the training timestep; the output is an eps, x0 or v prediction (``pred=``).
Adapters below turn the discrete and flow conventions into D(x; sigma).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor

Pred = Literal["eps", "x0", "v"]
Spacing = Literal["leading", "trailing", "linspace"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")

Denoiser = Callable[..., Tensor]  # D(x, sigma, **cond) -> x0_hat
VelocityModel = Callable[..., Tensor]  # v(x, t, **cond) -> eps - x0 estimate
DiscreteModel = Callable[..., Tensor]  # model(x_t, t_long, **cond) -> eps | x0 | v


# ----------------------------------------------------------------------------- helpers


def _check_pred(pred: str, where: str) -> None:
    if pred not in PREDICTIONS:
        raise ValueError(f"{where}: pred must be one of {PREDICTIONS}, got {pred!r}")


def expand_to(coef: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a per-sample coefficient (scalar or shape (B,)) against x of shape (B, ...).

    Why: every formula multiplies images by per-sample scalars; one broadcasting rule avoids
    silent (B,) * (B, C, H, W) mistakes that torch would otherwise broadcast along the wrong axis.
    """
    c = torch.as_tensor(coef, device=x.device)
    if c.ndim == 0:
        return c.to(x.dtype)
    if c.ndim == 1 and x.ndim >= 1 and c.shape[0] == x.shape[0]:
        return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    if c.shape == x.shape:
        return c.to(x.dtype)
    if c.ndim == x.ndim and c.shape[0] == x.shape[0] and all(d == 1 for d in c.shape[1:]):
        return c.to(x.dtype)  # already expanded: (B, 1, ..., 1)
    raise ValueError(
        f"coefficient of shape {tuple(c.shape)} does not match x of shape {tuple(x.shape)}: "
        "expected a scalar, shape (B,) with B = x.shape[0], or x's own shape"
    )


def _check_probs(ab: Tensor, where: str) -> None:
    if ab.ndim != 1 or ab.numel() == 0:
        raise ValueError(f"{where}: alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(ab.shape)}")
    if not torch.isfinite(ab).all() or (ab <= 0).any() or (ab > 1).any():
        raise ValueError(f"{where}: alphas_cumprod values must lie in (0, 1]")
    if (ab[1:] > ab[:-1]).any():
        raise ValueError(f"{where}: alphas_cumprod must be non-increasing in t")


# ----------------------------------------------------------------------------- DDPM schedules


def betas_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear beta schedule of Ho et al. 2020 (Sec. 4): beta_1=1e-4 ... beta_T=0.02 for T=1000."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"betas_linear: T must be a positive int, got {T!r}")
    if not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(
            f"betas_linear: need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_alpha_bar(t: Tensor | float, s: float = 0.008) -> Tensor:
    """Continuous cosine alpha-bar f(t) = cos^2(((t + s) / (1 + s)) * pi/2), t in [0, 1].

    Nichol & Dhariwal 2021, "Improved DDPM", eq. 17 (without the f(0) normalisation, as in
    their released code and diffusers' ``squaredcos_cap_v2``).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def betas_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021): beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta).

    The clip at max_beta avoids the singular beta=1 at t=T; it is why the last betas equal max_beta.
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"betas_cosine: T must be a positive int, got {T!r}")
    if not (0.0 <= s < 1.0):
        raise ValueError(f"betas_cosine: offset s must be in [0, 1), got {s}")
    if not (0.0 < max_beta < 1.0):
        raise ValueError(f"betas_cosine: max_beta must be in (0, 1), got {max_beta}")
    i = torch.arange(T, dtype=torch.float64)
    f1 = cosine_alpha_bar(i / T, s)
    f2 = cosine_alpha_bar((i + 1) / T, s)
    return torch.clamp(1.0 - f2 / f1, max=max_beta)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ab_t = prod_{s<=t} (1 - beta_s), computed in float64."""
    b = torch.as_tensor(betas, dtype=torch.float64)
    if b.ndim != 1 or b.numel() == 0:
        raise ValueError(f"alphas_cumprod: betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
        raise ValueError("alphas_cumprod: every beta must lie in (0, 1)")
    return torch.cumprod(1.0 - b, dim=0)


def _gather_ab(alphas_cumprod: Tensor, t: Tensor | int, x: Tensor, where: str) -> Tensor:
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    tt = torch.as_tensor(t, device=ab.device)
    if tt.dtype.is_floating_point:
        raise ValueError(f"{where}: t must be integer timesteps, got dtype {tt.dtype}")
    if (tt < 0).any() or (tt >= ab.numel()).any():
        raise ValueError(f"{where}: t must be in [0, {ab.numel() - 1}], got values {tt.tolist()}")
    return expand_to(ab[tt.long()].to(x.device), x)


def q_sample(x0: Tensor, t: Tensor | int, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) given the noise eps (Ho et al. eq. 4)."""
    if x0.shape != eps.shape:
        raise ValueError(f"q_sample: x0 shape {tuple(x0.shape)} != eps shape {tuple(eps.shape)}")
    ab = _gather_ab(alphas_cumprod, t, x0, "q_sample")
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def sigma_from_alpha_bar(ab: Tensor) -> Tensor:
    """EDM noise level of a DDPM step: sigma = sqrt((1 - ab) / ab)."""
    ab = torch.as_tensor(ab, dtype=torch.float64)
    return ((1 - ab) / ab).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """Inverse of sigma_from_alpha_bar: ab = 1 / (1 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma**2)


# ----------------------------------------------------------------------------- prediction conversions


def x0_eps_from_pred(out: Tensor, x_t: Tensor, ab: Tensor | float, pred: Pred) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) implied by a network output of kind ``pred`` at x_t with alpha-bar ``ab``.

    eps:  x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)
    x0:   eps = (x_t - sqrt(ab) x0) / sqrt(1-ab)
    v:    x0 = sqrt(ab) x_t - sqrt(1-ab) v,  eps = sqrt(1-ab) x_t + sqrt(ab) v   (Salimans & Ho 2022)
    """
    _check_pred(pred, "x0_eps_from_pred")
    if out.shape != x_t.shape:
        raise ValueError(f"x0_eps_from_pred: output shape {tuple(out.shape)} != x_t shape {tuple(x_t.shape)}")
    a = expand_to(torch.as_tensor(ab, dtype=torch.float64), x_t)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if pred == "eps":
        return (x_t - sb * out) / sa, out
    if pred == "x0":
        return out, (x_t - sa * out) / sb
    return sa * x_t - sb * out, sb * x_t + sa * out


def pred_from_x0_eps(x0: Tensor, eps: Tensor, ab: Tensor | float, pred: Pred) -> Tensor:
    """Training target of kind ``pred`` for the pair (x0, eps) at alpha-bar ``ab``."""
    _check_pred(pred, "pred_from_x0_eps")
    if x0.shape != eps.shape:
        raise ValueError(f"pred_from_x0_eps: x0 shape {tuple(x0.shape)} != eps shape {tuple(eps.shape)}")
    if pred == "eps":
        return eps
    if pred == "x0":
        return x0
    a = expand_to(torch.as_tensor(ab, dtype=torch.float64), x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def convert_pred(out: Tensor, x_t: Tensor, ab: Tensor | float, src: Pred, dst: Pred) -> Tensor:
    """Re-express a network output of kind ``src`` as kind ``dst`` (same x_t, same ab)."""
    x0, eps = x0_eps_from_pred(out, x_t, ab, src)
    return pred_from_x0_eps(x0, eps, ab, dst)


# ----------------------------------------------------------------------------- respacing


def respace(
    alphas_cumprod: Tensor | int, steps: int, spacing: Spacing = "leading", steps_offset: int = 0
) -> Tensor:
    """Training timesteps (descending, int64) used by a ``steps``-step sampler.

    Same semantics as diffusers' ``timestep_spacing`` (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Table 2), with T = len(alphas_cumprod):
      leading:  arange(steps) * (T // steps) + steps_offset, reversed (never reaches T-1)
      trailing: round(arange(T, 0, -T/steps)) - 1 (always starts at T-1)
      linspace: round(linspace(0, T-1, steps)), reversed
    ``alphas_cumprod`` may also be T itself.
    """
    T = alphas_cumprod if isinstance(alphas_cumprod, int) else int(torch.as_tensor(alphas_cumprod).numel())
    if T < 1:
        raise ValueError(f"respace: need at least one training timestep, got T={T}")
    if not isinstance(steps, int) or not (1 <= steps <= T):
        raise ValueError(f"respace: steps must be an int in [1, T={T}], got {steps!r}")
    # numpy on purpose: its arange/linspace/round rounding is what diffusers uses, and e.g.
    # linspace(0, 999, 27)[13] is 499.4999.. in numpy but 499.5 (-> 500) in torch.
    if spacing == "leading":
        ratio = T // steps
        arr = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        arr = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        # float arange can overshoot by one element (e.g. T=1000, steps=61 gives a 62nd value
        # that rounds to timestep -1 in diffusers 0.42); keep exactly `steps` values.
        arr = arr[:steps]
    elif spacing == "linspace":
        arr = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"respace: spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    ts = torch.from_numpy(arr.copy())
    if (ts < 0).any() or (ts >= T).any():
        raise ValueError(f"respace: timesteps {ts.tolist()} fall outside [0, {T - 1}] (check steps_offset)")
    return ts


# ----------------------------------------------------------------------------- EDM


def edm_precond(sigma: Tensor | float, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1):

    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),  c_noise = ln(sigma) / 4,
    so D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).
    """
    if sigma_data <= 0:
        raise ValueError(f"edm_precond: sigma_data must be > 0, got {sigma_data}")
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if (s <= 0).any():
        raise ValueError("edm_precond: sigma must be > 0 (ln(sigma) is the network's noise input)")
    sd2 = sigma_data**2
    denom = s**2 + sd2
    return sd2 / denom, s * sigma_data / denom.sqrt(), 1.0 / denom.sqrt(), s.log() / 4


def edm_loss_weight(sigma: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2 (Karras et al. 2022, Table 1)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if (s <= 0).any() or sigma_data <= 0:
        raise ValueError("edm_loss_weight: sigma and sigma_data must be > 0")
    return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


def edm_network_io(x0: Tensor, noise: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """(network input c_in (x0 + sigma n), effective target (x0 - c_skip (x0 + sigma n)) / c_out).

    Training F on this target with unit weight equals training D with lambda(sigma) (EDM eq. 8).
    """
    if x0.shape != noise.shape:
        raise ValueError(f"edm_network_io: x0 shape {tuple(x0.shape)} != noise shape {tuple(noise.shape)}")
    c_skip, c_out, c_in, _ = (expand_to(c, x0) for c in edm_precond(sigma, sigma_data))
    x = x0 + expand_to(torch.as_tensor(sigma, dtype=torch.float64), x0) * noise
    return c_in * x, (x0 - c_skip * x) / c_out


def sample_sigma_lognormal(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training noise levels ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)."""
    if n < 1 or p_std <= 0:
        raise ValueError(f"sample_sigma_lognormal: need n >= 1 and p_std > 0, got n={n}, p_std={p_std}")
    z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
    return (p_mean + p_std * z).exp()


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """n noise levels sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0.

    Karras et al. 2022, eq. 5.  Returns n + 1 values (descending, last is exactly 0) so a sampler
    with n steps walks sigmas[i] -> sigmas[i+1].
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"karras_sigmas: n must be a positive int, got {n!r}")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"karras_sigmas: rho must be > 0, got {rho}")
    if n == 1:
        sig = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sig = (hi + ramp * (lo - hi)) ** rho
        sig[0], sig[-1] = sigma_max, sigma_min  # exact endpoints despite pow round-off
    return torch.cat([sig, sig.new_zeros(1)])


def edm_denoiser(net: Callable[..., Tensor], sigma_data: float = 0.5) -> Denoiser:
    """Wrap a raw network F(c_in x, c_noise, **cond) into D(x; sigma) with EDM preconditioning."""

    def denoise(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, sigma_data)
        f = net(expand_to(c_in, x) * x, c_noise.to(x.dtype), **cond)
        return expand_to(c_skip, x) * x + expand_to(c_out, x) * f

    return denoise


# ----------------------------------------------------------------------------- flow matching


def flow_interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """Linear (rectified-flow) path x_t = (1 - t) x0 + t eps."""
    if x0.shape != eps.shape:
        raise ValueError(f"flow_interpolate: x0 shape {tuple(x0.shape)} != eps shape {tuple(eps.shape)}")
    tt = expand_to(torch.as_tensor(t, dtype=torch.float64), x0)
    return (1 - tt) * x0 + tt * eps


def flow_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Conditional velocity d x_t / dt = eps - x0 on the linear path (regression target)."""
    if x0.shape != eps.shape:
        raise ValueError(f"flow_target: x0 shape {tuple(x0.shape)} != eps shape {tuple(eps.shape)}")
    return eps - x0


def sample_t_uniform(n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """t ~ U(0, 1) (Lipman et al. 2023)."""
    if n < 1:
        raise ValueError(f"sample_t_uniform: n must be >= 1, got {n}")
    return torch.rand(n, generator=generator, dtype=torch.float64, device=device)


def sample_t_logit_normal(
    n: int, m: float = 0.0, s: float = 1.0, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """t = sigmoid(m + s z), z ~ N(0, 1): the logit-normal sampler of Esser et al. 2024 (SD3, eq. 19)."""
    if n < 1 or s <= 0:
        raise ValueError(f"sample_t_logit_normal: need n >= 1 and s > 0, got n={n}, s={s}")
    return torch.sigmoid(m + s * torch.randn(n, generator=generator, dtype=torch.float64, device=device))


def _t(t: Tensor | float, x: Tensor) -> Tensor:
    return expand_to(torch.as_tensor(t, dtype=torch.float64), x)


def velocity_to_x0(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """x0 = x_t - t v (linear path)."""
    return x_t - _t(t, x_t) * v


def velocity_to_eps(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """eps = x_t + (1 - t) v (linear path)."""
    return x_t + (1 - _t(t, x_t)) * v


def x0_to_velocity(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """v = (x_t - x0) / t; undefined at t = 0."""
    tt = _t(t, x_t)
    if (tt <= 0).any():
        raise ValueError("x0_to_velocity: t must be > 0 (velocity from x0 is undefined at t=0)")
    return (x_t - x0) / tt


def eps_to_velocity(x_t: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """v = (eps - x_t) / (1 - t); undefined at t = 1."""
    tt = _t(t, x_t)
    if (tt >= 1).any():
        raise ValueError("eps_to_velocity: t must be < 1 (velocity from eps is undefined at t=1)")
    return (eps - x_t) / (1 - tt)


# ----------------------------------------------------------------------------- adapters -> D(x; sigma)


def _sigma_to_t(sigma: Tensor, alphas_cumprod: Tensor, quantize: bool) -> Tensor:
    """Training timestep for each sigma, by position in the log-sigma table (ascending in t)."""
    log_sig = sigma_from_alpha_bar(alphas_cumprod).log()  # ascending with t
    ls = sigma.to(torch.float64).log()
    if quantize:
        return (ls[:, None] - log_sig[None, :]).abs().argmin(dim=1)
    idx = torch.searchsorted(log_sig, ls).clamp(1, log_sig.numel() - 1)
    lo, hi = log_sig[idx - 1], log_sig[idx]
    w = ((ls - lo) / (hi - lo)).clamp(0, 1)
    return (idx - 1).to(torch.float64) + w


def ddpm_to_edm(
    model: DiscreteModel, alphas_cumprod: Tensor, pred: Pred = "eps", quantize: bool = True
) -> Denoiser:
    """Turn a discrete-time eps/x0/v model into an EDM denoiser D(x; sigma) -> x0_hat.

    D(x; sigma) evaluates ``model(x / sqrt(1 + sigma^2), t(sigma), **cond)``: the DDPM input is
    x_t = sqrt(ab) x with ab = 1 / (1 + sigma^2) taken from the *requested* sigma (so the scaling
    is exact), while the timestep fed to the model is the training step whose sigma_t =
    sqrt((1-ab_t)/ab_t) is nearest in log-sigma (quantize=True, long tensor) or a fractional t
    interpolated linearly in log-sigma (quantize=False, float tensor; only for models that accept
    continuous t).  Sigmas outside [sigma_0, sigma_{T-1}] are clamped to the end steps.
    The conversion back to x0 uses the same ab (k-diffusion's DiscreteEps/VDDPMDenoiser idea).
    """
    _check_pred(pred, "ddpm_to_edm")
    ab_table = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    _check_probs(ab_table, "ddpm_to_edm")

    def denoise(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]).cpu()
        if (s <= 0).any():
            raise ValueError("ddpm_to_edm denoiser: sigma must be > 0 (call it only at positive noise levels)")
        ab = alpha_bar_from_sigma(s)
        x_t = expand_to(ab.sqrt(), x) * x
        t = _sigma_to_t(s, ab_table, quantize).to(x.device)
        out = model(x_t, t, **cond)
        x0, _ = x0_eps_from_pred(out, x_t, ab, pred)
        return x0

    return denoise


def flow_to_edm(velocity: VelocityModel) -> Denoiser:
    """Turn a linear-path velocity model v(x_t, t) into D(x; sigma) -> x0_hat.

    x_t = (1 - t) x0 + t eps = (1 - t)(x0 + sigma eps) with sigma = t / (1 - t), so
    D(x; sigma) = x_t - t v(x_t, t) with t = sigma / (1 + sigma), x_t = x / (1 + sigma).
    Every finite sigma > 0 maps to t in (0, 1); pure noise (t = 1) has no finite sigma.
    """

    def denoise(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        if (s < 0).any():
            raise ValueError("flow_to_edm denoiser: sigma must be >= 0")
        t = s / (1 + s)
        x_t = x / expand_to(1 + s, x)
        return velocity_to_x0(x_t, velocity(x_t, t.to(x.dtype), **cond), t)

    return denoise


def edm_to_velocity(denoiser: Denoiser) -> VelocityModel:
    """Inverse of flow_to_edm: v(x_t, t) = (x_t - D(x_t / (1 - t); t / (1 - t))) / t for t in (0, 1)."""

    def velocity(x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        tt = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        if (tt <= 0).any() or (tt >= 1).any():
            raise ValueError("edm_to_velocity: t must be in (0, 1) (sigma = t/(1-t) must be finite and > 0)")
        sigma = tt / (1 - tt)
        x0 = denoiser(x_t / expand_to(1 - tt, x_t), sigma.to(x_t.dtype), **cond)
        return (x_t - x0) / expand_to(tt, x_t)

    return velocity


# ----------------------------------------------------------------------------- classifier-free guidance


def cfg_combine(cond_out: Tensor, uncond_out: Tensor, scale: float | Tensor) -> Tensor:
    """uncond + scale (cond - uncond) (Ho & Salimans 2022); scale 1 = conditional, 0 = unconditional.

    Linear in the output, so it is valid for eps, x0, v and velocity outputs alike (not for
    outputs that are non-linear in the score, e.g. log-variances).
    """
    if cond_out.shape != uncond_out.shape:
        raise ValueError(
            f"cfg_combine: cond shape {tuple(cond_out.shape)} != uncond shape {tuple(uncond_out.shape)}"
        )
    return uncond_out + expand_to(torch.as_tensor(scale, dtype=torch.float64), cond_out) * (cond_out - uncond_out)


def _cat_cond(cond: dict[str, Any], uncond: dict[str, Any], batch: int) -> dict[str, Any]:
    if set(cond) != set(uncond):
        raise ValueError(f"cfg: cond keys {sorted(cond)} != uncond keys {sorted(uncond)}")
    merged: dict[str, Any] = {}
    for k in cond:
        a, b = cond[k], uncond[k]
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if a.shape[0] != batch or b.shape[0] != batch or a.shape[1:] != b.shape[1:]:
                raise ValueError(
                    f"cfg: conditioning {k!r} must have batch {batch} and equal trailing shapes, "
                    f"got cond {tuple(a.shape)} and uncond {tuple(b.shape)}"
                )
            merged[k] = torch.cat([a, b], dim=0)
        elif isinstance(a, Tensor) or isinstance(b, Tensor):
            raise ValueError(f"cfg: conditioning {k!r} is a tensor on one side only")
        elif a != b:
            raise ValueError(f"cfg: non-tensor conditioning {k!r} differs between cond and uncond ({a!r} vs {b!r})")
        else:
            merged[k] = a
    return merged


def cfg_wrap(
    model: Callable[..., Tensor], scale: float, cond: dict[str, Any], uncond: dict[str, Any]
) -> Callable[..., Tensor]:
    """Guided model with the same call convention as ``model(x, level, **extra)``.

    Each call runs ONE forward on the doubled batch [x, x] with conditioning cat([cond, uncond])
    (uncond may hold a negative prompt's embedding instead of the null one) and returns
    cfg_combine(cond_half, uncond_half, scale).  Works for denoisers (level = sigma), velocity
    models (level = t) and discrete models (level = t) alike, since the combination is linear.
    Tensor entries of cond/uncond are batch-first with the batch of x; others must be equal.
    """

    def guided(x: Tensor, level: Tensor, **extra: Any) -> Tensor:
        B = x.shape[0]
        merged = _cat_cond(cond, uncond, B)
        lv = torch.as_tensor(level, device=x.device)
        lv = lv.reshape(-1).expand(B) if lv.numel() in (1, B) else lv
        out = model(torch.cat([x, x]), torch.cat([lv, lv]), **merged, **extra)
        c, u = out.chunk(2, dim=0)
        return cfg_combine(c, u, scale)

    return guided
