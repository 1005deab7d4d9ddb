"""Stateless samplers: agreement with diffusers' schedulers, exactness on a Gaussian toy problem
(where the optimal denoiser and the exact ODE solution are known in closed form), NFE counts."""

from __future__ import annotations

import math

import pytest
import torch

from models import diffusion as dm
from models import samplers as sm

F64 = torch.float64
T = 1000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- Gaussian toy problem
# Data x0 ~ N(MU, S^2) elementwise (MU varies per coordinate).  Every posterior mean is linear,
# and the probability-flow ODE is solved exactly by an affine map, so samplers can be scored
# deterministically against the exact endpoint rather than only statistically.
MU = torch.tensor([0.3, -0.7, 1.2, 0.0], dtype=F64)
S = 0.5


def oracle_D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s2 = dm.expand_to(torch.as_tensor(sigma, dtype=x.dtype) ** 2, x)
    return MU.to(x.dtype) + S**2 / (S**2 + s2) * (x - MU.to(x.dtype))


def oracle_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = dm.expand_to(torch.as_tensor(t, dtype=x.dtype), x)
    c = 1 - tt
    mu = MU.to(x.dtype)
    var = c**2 * S**2 + tt**2
    return tt / var * (x - c * mu) - (mu + c * S**2 / var * (x - c * mu))


def oracle_discrete(ab_table: torch.Tensor, pred: str):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = ab_table[t.long()]
        a, b = dm.expand_to(ab.sqrt(), x), dm.expand_to((1 - ab).sqrt(), x)
        mu = MU.to(x.dtype)
        x0 = mu + a * S**2 / (a**2 * S**2 + b**2) * (x - a * mu)
        eps = (x - a * x0) / b
        return dm.pred_from_x0_eps(x0, eps, ab, pred).to(x.dtype)

    return model


def exact_edm_endpoint(x_start: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """Exact PF-ODE solution at sigma=0: x - mu scales with sqrt(S^2 + sigma^2)."""
    return MU + S / math.sqrt(S**2 + sigma_start**2) * (x_start - MU)


def marginal(n: int, sigma: float, seed: int) -> torch.Tensor:
    """Exact samples of p(x; sigma) = N(MU, S^2 + sigma^2)."""
    return MU + math.sqrt(S**2 + sigma**2) * torch.randn(n, 4, generator=_gen(seed), dtype=F64)


def assert_moments(x: torch.Tensor, tol_sd: float = 5.0) -> None:
    n = x.shape[0]
    se_mean = S / math.sqrt(n)
    se_std = S / math.sqrt(2 * n)
    assert torch.all((x.mean(0) - MU).abs() < tol_sd * se_mean), x.mean(0)
    assert torch.all((x.std(0) - S).abs() < tol_sd * se_std), x.std(0)


def ab_table(schedule: str) -> torch.Tensor:
    return dm.alphas_cumprod(dm.betas_linear(T) if schedule == "linear" else dm.betas_cosine(T))


# ----------------------------------------------------------------------------- diffusers: single steps

SCHED = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def _to_f64(sch) -> None:
    """Run a diffusers scheduler in float64 so step comparisons test formulas, not rounding."""
    sch.alphas_cumprod = sch.alphas_cumprod.to(F64)
    sch.one = torch.tensor(1.0, dtype=F64)
    if hasattr(sch, "final_alpha_cumprod"):
        sch.final_alpha_cumprod = sch.final_alpha_cumprod.to(F64)
PRED = {"eps": "epsilon", "v": "v_prediction"}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_step_matches_diffusers(schedule, pred, spacing, variance):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(
        beta_schedule=SCHED[schedule], prediction_type=PRED[pred], timestep_spacing=spacing, clip_sample=False,
        variance_type="fixed_small" if variance == "beta_tilde" else "fixed_large",
    )
    sch.set_timesteps(20)
    _to_f64(sch)
    ab = sch.alphas_cumprod
    ts = dm.respace(ab, 20, spacing)
    assert torch.equal(ts, sch.timesteps)
    g = _gen(0)
    for i, t in enumerate(ts.tolist()):
        x = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)
        out = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)
        seed = 1000 + i
        ref = sch.step(out, t, x, generator=_gen(seed))
        ab_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        # diffusers adds noise whenever t > 0 (also on a last step at t > 0), drawn like ours
        noise = torch.randn(x.shape, generator=_gen(seed), dtype=F64) if t > 0 else None
        mine, x0 = sm.ddpm_step(x, out, float(ab[t]), ab_prev, pred, noise, variance)
        torch.testing.assert_close(mine, ref.prev_sample, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(schedule, pred, spacing, eta):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(
        beta_schedule=SCHED[schedule], prediction_type=PRED[pred], timestep_spacing=spacing, clip_sample=False,
    )
    n = 15
    sch.set_timesteps(n)
    _to_f64(sch)
    ab = sch.alphas_cumprod
    g = _gen(1)
    for t in sch.timesteps.tolist():
        x = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)
        out = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)
        noise = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)
        ref = sch.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None)
        prev_t = t - T // n  # diffusers' DDIM rule (see test_ddim_prev_timestep_rule_differs_from_diffusers)
        ab_prev = float(ab[prev_t]) if prev_t >= 0 else 1.0
        mine, x0 = sm.ddim_step(x, out, float(ab[t]), ab_prev, eta, pred, noise if eta > 0 else None)
        torch.testing.assert_close(mine, ref.prev_sample, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-9, atol=1e-9)


def test_float32_diffusers_agrees_to_1e5_on_linear_schedule():
    """Unmodified float32 diffusers vs our float64 math on the same float32 inputs.  (On the
    cosine schedule's tail, ab ~ 1e-8, float32 rounding alone moves eta=1 DDIM steps by ~5e-5,
    so the exact comparisons above run diffusers in float64.)"""
    diffusers = pytest.importorskip("diffusers")
    for pred in ("eps", "v"):
        sch = diffusers.DDIMScheduler(prediction_type=PRED[pred], clip_sample=False)
        sch.set_timesteps(10)
        ab = sch.alphas_cumprod.to(F64)
        g = _gen(2)
        for t in sch.timesteps.tolist():
            x, out, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
            ref = sch.step(out, t, x, eta=0.5, variance_noise=noise)
            ab_prev = float(ab[t - 100]) if t >= 100 else 1.0
            mine, _ = sm.ddim_step(x.to(F64), out.to(F64), float(ab[t]), ab_prev, 0.5, pred, noise.to(F64))
            torch.testing.assert_close(mine.float(), ref.prev_sample, rtol=1e-5, atol=1e-5)


def test_clipped_steps_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ab = diffusers.DDPMScheduler().alphas_cumprod.to(F64)
    x = torch.randn(4, 8, generator=_gen(2)) * 2
    out = torch.randn(4, 8, generator=_gen(3))
    for t, t_prev in ((900, 800), (500, 400), (100, 0)):
        sch = diffusers.DDIMScheduler(clip_sample=True)
        sch.set_timesteps(10)
        ref = sch.step(out, t, x, eta=0.0)
        mine, x0 = sm.ddim_step(x.to(F64), out.to(F64), float(ab[t]), float(ab[t_prev]), clip_denoised=1.0)
        assert x0.abs().max().item() <= 1.0
        torch.testing.assert_close(mine.float(), ref.prev_sample, rtol=1e-5, atol=1e-5)
        sch = diffusers.DDPMScheduler(clip_sample=True)
        sch.set_timesteps(10)
        ref = sch.step(out, t, x, generator=_gen(4))
        noise = torch.randn(x.shape, generator=_gen(4))
        mine, _ = sm.ddpm_step(x.to(F64), out.to(F64), float(ab[t]), float(ab[t_prev]), noise=noise.to(F64),
                               clip_denoised=1.0)
        torch.testing.assert_close(mine.float(), ref.prev_sample, rtol=1e-5, atol=1e-5)


def test_ddim_prev_timestep_rule_differs_from_diffusers():
    """diffusers' DDIM steps to t - T//n; we step to the next listed timestep.  Same for leading
    spacing, different for linspace (and trailing when T % n != 0) — pinned here on purpose."""
    diffusers = pytest.importorskip("diffusers")
    for spacing, n, same in (("leading", 7, True), ("trailing", 10, True), ("linspace", 10, False),
                             ("trailing", 7, False)):
        sch = diffusers.DDIMScheduler(timestep_spacing=spacing)
        sch.set_timesteps(n)
        listed = sch.timesteps.tolist()[1:]
        theirs = [t - T // n for t in sch.timesteps.tolist()[:-1]]
        assert (listed == theirs) is same, (spacing, n, listed, theirs)


# ----------------------------------------------------------------------------- diffusers: whole runs


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_ancestral_matches_diffusers_loop(pred, spacing):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=PRED[pred],
                                  timestep_spacing=spacing, clip_sample=False)
    ab = sch.alphas_cumprod.to(F64)
    sch.set_timesteps(25)
    model = oracle_discrete(ab, pred)
    x_T = torch.randn(64, 4, generator=_gen(5))
    g = _gen(6)
    x = x_T
    for t in sch.timesteps:
        x = sch.step(model(x, t.expand(x.shape[0])), t, x, generator=g).prev_sample
    res = sm.ddpm_ancestral(model, x_T, ab, dm.respace(ab, 25, spacing), pred=pred, generator=_gen(6))
    assert res.nfe == 25
    torch.testing.assert_close(res.sample, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers_loop(eta, spacing):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(prediction_type="v_prediction", timestep_spacing=spacing, clip_sample=False)
    ab = sch.alphas_cumprod.to(F64)
    sch.set_timesteps(20)
    model = oracle_discrete(ab, "v")
    x_T = torch.randn(64, 4, generator=_gen(7))
    g = _gen(8)
    x = x_T
    for t in sch.timesteps:
        x = sch.step(model(x, t.expand(x.shape[0])), t, x, eta=eta, generator=g).prev_sample
    res = sm.ddim(model, x_T, ab, dm.respace(ab, 20, spacing), eta=eta, pred="v", generator=_gen(8),
                  return_trajectory=True)
    torch.testing.assert_close(res.sample, x, rtol=1e-4, atol=1e-4)
    assert res.nfe == 20 and len(res.trajectory) == 21
    assert res.trajectory[0] is x_T and res.trajectory[-1] is res.sample


# ----------------------------------------------------------------------------- DDIM / DDPM on the toy problem


def test_ddim_eta0_is_deterministic_and_eta_positive_is_not():
    ab = ab_table("linear")
    ts = dm.respace(ab, 10)
    model = oracle_discrete(ab, "eps")
    x_T = torch.randn(8, 4, generator=_gen(9), dtype=F64)
    a = sm.ddim(model, x_T, ab, ts, generator=_gen(1)).sample
    b = sm.ddim(model, x_T, ab, ts, generator=_gen(2)).sample
    assert torch.equal(a, b)
    c = sm.ddim(model, x_T, ab, ts, eta=1.0, generator=_gen(1)).sample
    d = sm.ddim(model, x_T, ab, ts, eta=1.0, generator=_gen(2)).sample
    assert not torch.allclose(c, d)
    assert torch.equal(c, sm.ddim(model, x_T, ab, ts, eta=1.0, generator=_gen(1)).sample)


def test_ddim_is_euler_in_sigma_space_and_converges_to_exact_ode():
    ab = ab_table("cosine")
    for pred in ("eps", "v"):
        model = oracle_discrete(ab, pred)
        ts = dm.respace(ab, 50, "trailing")
        x_T = torch.randn(16, 4, generator=_gen(10), dtype=F64)
        res = sm.ddim(model, x_T, ab, ts, pred=pred)
        # Same walk as EDM Euler on sigma_t with x scaled by 1/sqrt(ab) (Karras et al. 2022, Sec. 3)
        sig = torch.cat([dm.sigma_from_alpha_bar(ab[ts]), torch.zeros(1, dtype=F64)])
        D = dm.ddpm_to_edm(model, ab, pred)
        e = sm.edm_euler(D, x_T / ab[ts[0]].sqrt(), sig)
        torch.testing.assert_close(res.sample, e.sample, rtol=1e-9, atol=1e-9)
    # and approaches the exact PF-ODE endpoint as steps grow
    model = oracle_discrete(ab, "eps")
    x_T = torch.randn(256, 4, generator=_gen(11), dtype=F64)
    s0 = float(dm.sigma_from_alpha_bar(ab[999]))
    exact = exact_edm_endpoint(x_T / ab[999].sqrt(), s0)
    errs = [(sm.ddim(model, x_T, ab, dm.respace(ab, n, "trailing")).sample - exact).abs().max().item()
            for n in (10, 100, 1000)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 5e-3  # measured 0.22, 0.024, 0.0024 for 10, 100, 1000 steps


def test_ddim_invert_then_ddim_reconstructs_x0():
    ab = ab_table("linear")
    model = oracle_discrete(ab, "eps")
    x0 = marginal(64, 0.0, 12)
    errs = {}
    for n in (20, 200, 1000):
        ts = dm.respace(ab, n, "leading")
        enc = sm.ddim_invert(model, x0, ab, ts, return_trajectory=True)
        assert enc.nfe == n and len(enc.trajectory) == n + 1
        rec = sm.ddim(model, enc.sample, ab, ts)
        errs[n] = (rec.sample - x0).abs().max().item()
    # explicit inversion is first order: error ~ 1/n (measured 0.41, 0.046, 0.0093)
    assert errs[20] / errs[200] > 5 and errs[200] / errs[1000] > 3
    assert errs[1000] < 0.02
    # fixed-point refinement makes the round trip exact up to the fixed-point tolerance
    ts = dm.respace(ab, 50, "leading")
    enc = sm.ddim_invert(model, x0, ab, ts, fixed_point_iters=6)
    assert enc.nfe == 50 * 7
    assert (sm.ddim(model, enc.sample, ab, ts).sample - x0).abs().max().item() < 1e-6
    # the code is (close to) a standard normal: DDIM's encoding maps data to noise
    z = sm.ddim_invert(model, marginal(4000, 0.0, 13), ab, dm.respace(ab, 100)).sample
    assert z.mean().abs().item() < 0.05 and abs(z.std().item() - 1) < 0.05


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
@pytest.mark.slow
def test_ddpm_ancestral_reaches_data_distribution(variance):
    ab = ab_table("linear")
    model = oracle_discrete(ab, "eps")
    x_T = torch.randn(10_000, 4, generator=_gen(14), dtype=F64)
    res = sm.ddpm_ancestral(model, x_T, ab, dm.respace(ab, 1000), generator=_gen(15), variance=variance)
    assert res.nfe == 1000
    assert_moments(res.sample)


def test_ddpm_variances_bracket_the_data_std_on_short_chains():
    """Ho et al. 2020 Sec. 3.2: beta_tilde and beta are the lower / upper bounds of the reverse
    variance; with 20 respaced steps that shows up directly in the sample std (0.39 vs 0.52)."""
    ab = ab_table("linear")
    model = oracle_discrete(ab, "eps")
    x_T = torch.randn(20_000, 4, generator=_gen(16), dtype=F64)
    ts = dm.respace(ab, 20, "trailing")
    lo = sm.ddpm_ancestral(model, x_T, ab, ts, generator=_gen(17), variance="beta_tilde").sample.std(0)
    hi = sm.ddpm_ancestral(model, x_T, ab, ts, generator=_gen(17), variance="beta").sample.std(0)
    assert torch.all(lo < S - 0.05) and torch.all(hi > S)


# ----------------------------------------------------------------------------- EDM samplers


def _edm_error(sampler, n_steps: int, seed: int = 20) -> tuple[float, int]:
    sig = dm.karras_sigmas(n_steps, 0.002, 80.0)
    x = marginal(512, 80.0, seed)
    res = sampler(oracle_D, x, sig)
    return (res.sample - exact_edm_endpoint(x, 80.0)).abs().max().item(), res.nfe


def test_edm_samplers_nfe_and_order():
    # equal NFE = 79: Euler 79 steps, Heun 40 steps (last step is Euler), DPM++(2M) 79 steps
    e_euler, nfe_e = _edm_error(sm.edm_euler, 79)
    e_heun, nfe_h = _edm_error(sm.edm_heun, 40)
    e_dpm, nfe_d = _edm_error(sm.dpmpp_2m, 79)
    assert (nfe_e, nfe_h, nfe_d) == (79, 79, 79)
    assert e_heun < e_euler / 3 and e_dpm < e_euler / 10  # measured 0.067, 0.018, 0.0045
    # convergence order: doubling steps cuts Euler error ~2x, Heun and DPM++(2M) ~4x
    e1, e2 = _edm_error(sm.edm_euler, 40)[0], _edm_error(sm.edm_euler, 80)[0]
    h1, h2 = _edm_error(sm.edm_heun, 40)[0], _edm_error(sm.edm_heun, 80)[0]
    d1, d2 = _edm_error(sm.dpmpp_2m, 40)[0], _edm_error(sm.dpmpp_2m, 80)[0]
    assert 1.6 < e1 / e2 < 2.5
    assert 3.2 < h1 / h2 < 5.0
    assert 3.2 < d1 / d2 < 5.0


@pytest.mark.parametrize("sampler,steps", [(sm.edm_euler, 256), (sm.edm_heun, 64), (sm.dpmpp_2m, 64)])
def test_edm_samplers_reach_data_distribution(sampler, steps):
    x = marginal(20_000, 80.0, 21)
    res = sampler(oracle_D, x, dm.karras_sigmas(steps))
    assert_moments(res.sample)


def test_edm_heun_churn_is_stochastic_but_keeps_distribution():
    x = marginal(20_000, 80.0, 22)
    sig = dm.karras_sigmas(128)
    a = sm.edm_heun(oracle_D, x, sig, s_churn=10, s_tmin=0.05, s_tmax=50, generator=_gen(1))
    b = sm.edm_heun(oracle_D, x, sig, s_churn=10, s_tmin=0.05, s_tmax=50, generator=_gen(2))
    assert not torch.allclose(a.sample, b.sample)
    assert a.nfe == 2 * 128 - 1
    assert_moments(a.sample)
    # churn outside [s_tmin, s_tmax] everywhere == deterministic Heun
    c = sm.edm_heun(oracle_D, x, sig, s_churn=40, s_tmin=100, s_tmax=200, generator=_gen(1))
    torch.testing.assert_close(c.sample, sm.edm_heun(oracle_D, x, sig).sample, rtol=0, atol=0)


def test_dpmpp_2m_first_step_is_ddim_and_trajectory():
    x = marginal(8, 80.0, 23)
    sig = dm.karras_sigmas(10)
    res = sm.dpmpp_2m(oracle_D, x, sig, return_trajectory=True)
    assert len(res.trajectory) == 11 and res.nfe == 10
    s0, s1 = sig[0].item(), sig[1].item()
    d0 = oracle_D(x, torch.full((8,), s0, dtype=F64))
    torch.testing.assert_close(res.trajectory[1], s1 / s0 * x + (1 - s1 / s0) * d0)  # first-order (DDIM) step


# ----------------------------------------------------------------------------- flow samplers


def _flow_error(sampler, n: int, seed: int = 30) -> tuple[float, int]:
    x1 = torch.randn(512, 4, generator=_gen(seed), dtype=F64)
    res = sampler(oracle_velocity, x1, sm.flow_timesteps(n))
    return (res.sample - (MU + S * x1)).abs().max().item(), res.nfe


def test_flow_samplers_heun_beats_euler():
    e_euler, nfe_e = _flow_error(sm.flow_euler, 20)
    e_heun, nfe_h = _flow_error(sm.flow_heun, 10)
    assert nfe_e == nfe_h == 20
    assert e_heun < e_euler / 5
    e_euler2, _ = _flow_error(sm.flow_euler, 40)
    e_heun2, _ = _flow_error(sm.flow_heun, 20)
    assert 1.5 < e_euler / e_euler2 < 2.6 and e_heun / e_heun2 > 3.0


@pytest.mark.parametrize("sampler,steps", [(sm.flow_euler, 200), (sm.flow_heun, 20)])
def test_flow_samplers_reach_data_distribution(sampler, steps):
    x1 = torch.randn(20_000, 4, generator=_gen(31), dtype=F64)
    res = sampler(oracle_velocity, x1, sm.flow_timesteps(steps, shift=3.0), return_trajectory=True)
    assert_moments(res.sample)
    assert len(res.trajectory) == steps + 1 and res.trajectory[0] is x1


def test_flow_euler_equals_edm_euler_through_adapter():
    ts = torch.linspace(0.98, 0.0, 21, dtype=F64)
    x1 = torch.randn(32, 4, generator=_gen(32), dtype=F64)
    a = sm.flow_euler(oracle_velocity, x1, ts)
    sig = ts / (1 - ts)
    b = sm.edm_euler(dm.flow_to_edm(oracle_velocity), x1 / (1 - ts[0]), sig)
    torch.testing.assert_close(a.sample, b.sample, rtol=1e-10, atol=1e-10)


def test_flow_timesteps_shift():
    t = sm.flow_timesteps(4)
    torch.testing.assert_close(t, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    s = sm.flow_timesteps(4, shift=3.0)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0 and torch.all(s[1:-1] > t[1:-1])


# ----------------------------------------------------------------------------- guidance, kwargs, errors


def test_cfg_wrapped_denoiser_in_sampler():
    calls = []

    def cond_D(x, sigma, y):  # class-conditional Gaussian oracle: mean shifted by y
        calls.append(x.shape[0])
        s2 = dm.expand_to(sigma**2, x)
        return y + S**2 / (S**2 + s2) * (x - y)

    x = marginal(16, 80.0, 40)
    sig = dm.karras_sigmas(8)
    y = torch.full((16, 4), 2.0, dtype=F64)
    plain = sm.edm_heun(cond_D, x, sig, cond={"y": y})
    calls.clear()
    guided = sm.edm_heun(dm.cfg_wrap(cond_D, 1.0, {"y": y}, {"y": torch.zeros_like(y)}), x, sig)
    assert guided.nfe == 15 and calls == [32] * 15  # one doubled-batch forward per evaluation
    torch.testing.assert_close(guided.sample, plain.sample)
    g3 = sm.edm_heun(dm.cfg_wrap(cond_D, 3.0, {"y": y}, {"y": torch.zeros_like(y)}), x, sig)
    assert g3.sample.mean().item() > plain.sample.mean().item() + 1  # extrapolates past the condition


def test_bad_grids_are_refused():
    ab = ab_table("linear")
    model = oracle_discrete(ab, "eps")
    x = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sm.ddim(model, x, ab, torch.tensor([10, 20]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        sm.ddpm_ancestral(model, x, ab, torch.tensor([1000, 10]))
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sm.ddim(model, x, ab, torch.tensor([20, 10]), eta=-0.1)
    with pytest.raises(ValueError, match="pred must be one of"):
        sm.ddim(model, x, ab, torch.tensor([20, 10]), pred="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
        sm.edm_heun(oracle_D, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="sigmas must be finite and >= 0"):
        sm.dpmpp_2m(oracle_D, x, torch.tensor([1.0, 0.5, -0.1]))
    with pytest.raises(ValueError, match=r"ts must be strictly decreasing within \[0, 1\]"):
        sm.flow_euler(oracle_velocity, x, torch.tensor([1.5, 0.0]))
    with pytest.raises(ValueError, match="variance must be"):
        sm.ddpm_step(x, x, 0.5, 0.6, variance="learned")
    with pytest.raises(ValueError, match="eta > 0 needs a noise tensor"):
        sm.ddim_step(x, x, 0.5, 0.6, eta=0.5)
