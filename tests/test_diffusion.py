"""Diffusion / flow-matching math: schedules, q(x_t|x0), parameterisations, EDM, flow, adapters, CFG."""

from __future__ import annotations

import math

import pytest
import torch

from models import diffusion as dm

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- Gaussian oracles
# Data x0 ~ N(MU, S^2) per element: every posterior mean is linear and known in closed form.
MU, S = 0.3, 0.5


def oracle_D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma n = x]."""
    s2 = dm.expand_to(torch.as_tensor(sigma, dtype=F64) ** 2, x)
    return MU + S**2 / (S**2 + s2) * (x - MU)


def oracle_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | (1-t) x0 + t eps = x]."""
    tt = dm.expand_to(torch.as_tensor(t, dtype=F64), x)
    c = 1 - tt
    var = c**2 * S**2 + tt**2
    x0 = MU + c * S**2 / var * (x - c * MU)
    eps = tt / var * (x - c * MU)
    return eps - x0


def oracle_discrete(ab_table: torch.Tensor, pred: str):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = ab_table[t.long()]
        a, b = dm.expand_to(ab.sqrt(), x), dm.expand_to((1 - ab).sqrt(), x)
        x0 = MU + a * S**2 / (a**2 * S**2 + b**2) * (x - a * MU)
        eps = (x - a * x0) / b
        return dm.pred_from_x0_eps(x0, eps, ab, pred)

    return model


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_values():
    b = dm.betas_linear(1000)
    assert b.dtype == F64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    ab = dm.alphas_cumprod(b)
    assert torch.all(ab[1:] < ab[:-1])
    # Ho et al.: the forward process ends close to pure noise (ab_T ~ 4e-5)
    assert 1e-5 < ab[-1].item() < 1e-4


def test_cosine_schedule_properties():
    T = 1000
    b = dm.betas_cosine(T)
    ab = dm.alphas_cumprod(b)
    assert torch.all(b > 0) and torch.all(b <= 0.999)
    assert b[-1].item() == pytest.approx(0.999)  # f(1) = 0 so the last beta hits the cap
    assert torch.all(ab[1:] < ab[:-1])
    # Where no clipping happens, the cumulative product telescopes: ab_t = f((t+1)/T) / f(0)
    t = torch.arange(0, 990)
    f = dm.cosine_alpha_bar
    tf = t.to(F64)
    torch.testing.assert_close(ab[t], f((tf + 1) / T) / f(torch.tensor(0.0)), rtol=1e-10, atol=1e-12)
    # Improved DDPM's point: cosine destroys information more slowly than linear in the middle
    lin = dm.alphas_cumprod(dm.betas_linear(T))
    assert ab[499].item() > 0.45 and lin[499].item() < 0.1
    # and ab itself falls almost linearly in the middle (Nichol & Dhariwal, Fig. 5):
    # cos^2 = (1 + cos 2u)/2 has slope ~ sin 2u, flat around u = pi/4
    d = ab[300:700:100] - ab[400:800:100]
    dl = lin[300:700:100] - lin[400:800:100]
    assert (d.max() - d.min()) / d.mean() < 0.15 < (dl.max() - dl.min()) / dl.mean()


def test_schedules_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for name, betas in (("linear", dm.betas_linear(1000)), ("squaredcos_cap_v2", dm.betas_cosine(1000))):
        s = diffusers.DDPMScheduler(beta_schedule=name)
        torch.testing.assert_close(s.betas.to(F64), betas, rtol=0, atol=1e-7)
        torch.testing.assert_close(s.alphas_cumprod.to(F64), dm.alphas_cumprod(betas), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_respace_matches_diffusers(spacing):
    diffusers = pytest.importorskip("diffusers")
    overshoots: list[int] = []
    for T in (1000, 37):
        for offset in (0, 1) if spacing == "leading" else (0,):
            s = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
            for n in range(1, T + 1):
                if offset and T // n <= 1:
                    continue  # leading + offset would need timestep T
                s.set_timesteps(n)
                ours = dm.respace(T, n, spacing, steps_offset=offset)
                theirs = s.timesteps
                if len(theirs) == n + 1:
                    # diffusers' float arange overshoot for "trailing": an extra timestep -1 at the
                    # end (which would index alphas_cumprod[-1]); we keep exactly n steps.
                    assert spacing == "trailing" and theirs[-1].item() == -1, (T, n, spacing)
                    theirs = theirs[:n]
                    overshoots.append(n)
                assert torch.equal(ours, theirs), (T, n, spacing, offset)
                assert ours.dtype == torch.int64 and len(ours) == n and torch.all(ours[1:] < ours[:-1])
    assert spacing == "trailing" or not overshoots


def test_respace_rejects_bad_arguments():
    ab = dm.alphas_cumprod(dm.betas_linear(100))
    with pytest.raises(ValueError, match="steps must be an int in"):
        dm.respace(ab, 101)
    with pytest.raises(ValueError, match="spacing must be"):
        dm.respace(ab, 10, "uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        dm.respace(ab, 10, "leading", steps_offset=20)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="T must be a positive int"):
        dm.betas_linear(0)
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        dm.betas_linear(10, 0.1, 0.01)
    with pytest.raises(ValueError, match="max_beta"):
        dm.betas_cosine(10, max_beta=1.0)
    with pytest.raises(ValueError, match="every beta must lie in"):
        dm.alphas_cumprod(torch.tensor([0.1, 1.0]))


# ----------------------------------------------------------------------------- q(x_t | x0)


def test_q_sample_moments():
    ab_table = dm.alphas_cumprod(dm.betas_linear(1000))
    x0 = torch.tensor([[-1.0, 0.0, 0.5, 2.0]], dtype=F64)
    N = 200_000
    for t in (0, 100, 500, 999):
        eps = torch.randn(N, 4, generator=_gen(t), dtype=F64)
        xt = dm.q_sample(x0.expand(N, 4), torch.full((N,), t), eps, ab_table)
        ab = ab_table[t]
        se = (1 - ab).sqrt() / math.sqrt(N)
        assert torch.all((xt.mean(0) - ab.sqrt() * x0[0]).abs() < 5 * se), t
        # var of the sample variance for Gaussian data: 2 sigma^4 / (N-1)
        var_se = math.sqrt(2 / (N - 1)) * (1 - ab)
        assert torch.all((xt.var(0) - (1 - ab)).abs() < 5 * var_se), t


def test_q_sample_per_sample_t_and_errors():
    ab = dm.alphas_cumprod(dm.betas_linear(10))
    x0 = torch.ones(3, 2, 2, dtype=F64)
    eps = torch.zeros_like(x0)
    out = dm.q_sample(x0, torch.tensor([0, 5, 9]), eps, ab)
    for i, t in enumerate((0, 5, 9)):
        torch.testing.assert_close(out[i], torch.full((2, 2), ab[t].sqrt().item(), dtype=F64))
    with pytest.raises(ValueError, match=r"t must be in \[0, 9\]"):
        dm.q_sample(x0, torch.tensor([0, 5, 10]), eps, ab)
    with pytest.raises(ValueError, match="integer timesteps"):
        dm.q_sample(x0, torch.tensor([0.5, 1.0, 2.0]), eps, ab)
    with pytest.raises(ValueError, match="does not match x"):
        dm.q_sample(x0, torch.tensor([0, 1]), eps, ab)


# ----------------------------------------------------------------------------- parameterisations


def test_prediction_conversions_round_trip():
    g = _gen(0)
    B = 16
    x0 = torch.randn(B, 3, 4, 4, generator=g, dtype=F64)
    eps = torch.randn(B, 3, 4, 4, generator=g, dtype=F64)
    ab = torch.rand(B, generator=g, dtype=F64) * 0.98 + 0.01
    xt = dm.expand_to(ab.sqrt(), x0) * x0 + dm.expand_to((1 - ab).sqrt(), x0) * eps
    v = dm.pred_from_x0_eps(x0, eps, ab, "v")
    # Salimans & Ho definition, written out independently
    torch.testing.assert_close(v, ab.sqrt()[:, None, None, None] * eps - (1 - ab).sqrt()[:, None, None, None] * x0)
    targets = {"eps": eps, "x0": x0, "v": v}
    for src in dm.PREDICTIONS:
        out = dm.pred_from_x0_eps(x0, eps, ab, src)
        got_x0, got_eps = dm.x0_eps_from_pred(out, xt, ab, src)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-12)
        for dst in dm.PREDICTIONS:
            torch.testing.assert_close(dm.convert_pred(out, xt, ab, src, dst), targets[dst], rtol=0, atol=1e-12)


def test_v_matches_diffusers_get_velocity():
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDPMScheduler()
    g = _gen(1)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    eps = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ab = dm.alphas_cumprod(dm.betas_linear(1000))
    ours = dm.pred_from_x0_eps(x0.to(F64), eps.to(F64), ab[t], "v")
    torch.testing.assert_close(ours.float(), s.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm.q_sample(x0.to(F64), t, eps.to(F64), ab).float(), s.add_noise(x0, eps, t),
                               rtol=1e-5, atol=1e-5)


def test_unknown_prediction_is_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="pred must be one of"):
        dm.x0_eps_from_pred(x, x, 0.5, "score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output shape"):
        dm.x0_eps_from_pred(torch.zeros(2, 4), x, 0.5, "eps")


# ----------------------------------------------------------------------------- EDM


def test_edm_precond_formulas():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = dm.edm_precond(sigma, 0.5)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    # c_skip^2 sd^2 ... identity: c_skip + c_out^2/sd^2 = 1 and loss weight = 1 / c_out^2
    torch.testing.assert_close(c_skip + c_out**2 / 0.25, torch.ones(3, dtype=F64))
    torch.testing.assert_close(dm.edm_loss_weight(sigma, 0.5), 1 / c_out**2)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        dm.edm_precond(torch.tensor([0.0]))


def test_edm_unit_variance_inputs_and_targets():
    sd = 0.5
    N = 100_000
    g = _gen(2)
    # Non-Gaussian data with std sigma_data: only the second moment matters for the design.
    x0 = (torch.randint(0, 2, (N,), generator=g, dtype=F64) * 2 - 1) * sd
    for sigma in (0.002, 0.05, 0.5, 5.0, 80.0):
        n = torch.randn(N, generator=g, dtype=F64)
        inp, target = dm.edm_network_io(x0, n, torch.full((N,), sigma, dtype=F64), sd)
        assert inp.var().item() == pytest.approx(1.0, abs=0.02), sigma
        assert target.var().item() == pytest.approx(1.0, abs=0.02), sigma
        # the effective target, put through the preconditioner, gives back x0 exactly
        c_skip, c_out, _, _ = dm.edm_precond(sigma, sd)
        torch.testing.assert_close(c_skip * (x0 + sigma * n) + c_out * target, x0, rtol=0, atol=1e-10)


def test_edm_denoiser_wrapper_with_oracle_network():
    sd = 0.5
    calls = []

    def net(x_in, c_noise):  # F that reproduces the Gaussian oracle through the preconditioning
        calls.append(c_noise)
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = dm.edm_precond(sigma, sd)
        x = x_in / dm.expand_to(c_in, x_in)
        return (oracle_D(x, sigma) - dm.expand_to(c_skip, x) * x) / dm.expand_to(c_out, x)

    D = dm.edm_denoiser(net, sd)
    x = torch.randn(5, 3, generator=_gen(3), dtype=F64) * 3
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0], dtype=F64)
    torch.testing.assert_close(D(x, sigma), oracle_D(x, sigma))
    torch.testing.assert_close(calls[0], sigma.log() / 4)


def test_lognormal_sigma_sampler():
    s = dm.sample_sigma_lognormal(100_000, generator=_gen(4))
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.02)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.02)
    assert torch.equal(s, dm.sample_sigma_lognormal(100_000, generator=_gen(4)))


def test_karras_sigmas_endpoints_and_rho():
    s = dm.karras_sigmas(18)
    assert s.shape == (19,)
    assert s[0].item() == 80.0 and s[-2].item() == 0.002 and s[-1].item() == 0.0
    assert torch.all(s[1:] < s[:-1])
    # rho=1 is a linear ramp; larger rho concentrates steps at low sigma (power mean decreasing in rho)
    torch.testing.assert_close(dm.karras_sigmas(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4, 3, 2, 1, 0], dtype=F64))
    prev = None
    for rho in (1.0, 3.0, 7.0, 20.0):
        cur = dm.karras_sigmas(10, rho=rho)[1:-2]
        if prev is not None:
            assert torch.all(cur < prev), rho
        prev = cur
    # geometric limit as rho -> infinity
    geo = 80.0 * (0.002 / 80.0) ** (torch.arange(10, dtype=F64) / 9)
    torch.testing.assert_close(dm.karras_sigmas(10, rho=1e6)[:-1], geo, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        dm.karras_sigmas(10, sigma_min=5.0, sigma_max=1.0)


# ----------------------------------------------------------------------------- flow matching


def test_flow_target_is_path_derivative():
    g = _gen(5)
    x0 = torch.randn(8, 4, generator=g, dtype=F64)
    eps = torch.randn(8, 4, generator=g, dtype=F64)
    t = torch.rand(8, generator=g, dtype=F64).requires_grad_(True)
    xt = dm.flow_interpolate(x0, eps, t)
    # d x_t / d t, per sample, by autograd through the interpolation
    grads = torch.stack([torch.autograd.grad(xt[:, j].sum(), t, retain_graph=True)[0] for j in range(4)], 1)
    torch.testing.assert_close(grads, dm.flow_target(x0, eps))
    td = t.detach()
    xt = xt.detach()
    v = dm.flow_target(x0, eps)
    torch.testing.assert_close(dm.velocity_to_x0(xt, v, td), x0)
    torch.testing.assert_close(dm.velocity_to_eps(xt, v, td), eps)
    torch.testing.assert_close(dm.x0_to_velocity(xt, x0, td), v)
    torch.testing.assert_close(dm.eps_to_velocity(xt, eps, td), v)
    with pytest.raises(ValueError, match="t must be > 0"):
        dm.x0_to_velocity(xt, x0, 0.0)


def test_flow_t_samplers():
    u = dm.sample_t_uniform(100_000, generator=_gen(6))
    assert 0 <= u.min().item() and u.max().item() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    t = dm.sample_t_logit_normal(100_000, m=0.5, s=0.8, generator=_gen(7))
    logit = (t / (1 - t)).log()
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)
    with pytest.raises(ValueError, match="s > 0"):
        dm.sample_t_logit_normal(10, s=0.0)


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_ddpm_to_edm_matches_oracle_on_table_sigmas(pred):
    ab = dm.alphas_cumprod(dm.betas_cosine(1000))
    D = dm.ddpm_to_edm(oracle_discrete(ab, pred), ab, pred)
    t = torch.tensor([0, 3, 250, 600, 990])
    sigma = dm.sigma_from_alpha_bar(ab[t])
    x = torch.randn(5, 6, generator=_gen(8), dtype=F64) * dm.expand_to((sigma**2 + S**2).sqrt(), torch.zeros(5, 6))
    torch.testing.assert_close(D(x, sigma), oracle_D(x, sigma), rtol=1e-9, atol=1e-9)


def test_ddpm_to_edm_timestep_lookup():
    ab = dm.alphas_cumprod(dm.betas_linear(1000))
    seen = []

    def model(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    sig = dm.sigma_from_alpha_bar(ab)
    mid = (sig[10].log() * 0.25 + sig[11].log() * 0.75).exp()  # 3/4 of the way from t=10 to t=11
    x = torch.ones(2, 1, dtype=F64)
    dm.ddpm_to_edm(model, ab, "eps", quantize=True)(x, torch.stack([sig[500], mid]))
    assert seen[-1].dtype == torch.int64 and seen[-1].tolist() == [500, 11]
    dm.ddpm_to_edm(model, ab, "eps", quantize=False)(x, torch.stack([sig[500], mid]))
    torch.testing.assert_close(seen[-1], torch.tensor([500.0, 10.75], dtype=F64))
    # eps = 0 means D(x) = x: the input scaling and the eps->x0 conversion use the same sigma
    out = dm.ddpm_to_edm(model, ab, "eps")(x, torch.stack([sig[500], mid]))
    torch.testing.assert_close(out, x)


def test_flow_to_edm_and_back():
    D = dm.flow_to_edm(oracle_velocity)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=F64)
    x = torch.randn(4, 5, generator=_gen(9), dtype=F64) * 2
    torch.testing.assert_close(D(x, sigma), oracle_D(x, sigma), rtol=1e-10, atol=1e-10)
    v = dm.edm_to_velocity(oracle_D)
    t = torch.tensor([0.05, 0.3, 0.7, 0.99], dtype=F64)
    torch.testing.assert_close(v(x, t), oracle_velocity(x, t), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"t must be in \(0, 1\)"):
        v(x, torch.tensor([0.0, 0.3, 0.7, 1.0]))


# ----------------------------------------------------------------------------- CFG


def test_cfg_combine_endpoints_and_linearity():
    g = _gen(10)
    c = torch.randn(3, 4, generator=g)
    u = torch.randn(3, 4, generator=g)
    torch.testing.assert_close(dm.cfg_combine(c, u, 1.0), c)
    torch.testing.assert_close(dm.cfg_combine(c, u, 0.0), u)
    torch.testing.assert_close(dm.cfg_combine(c, u, 7.5), u + 7.5 * (c - u))
    # per-sample scales
    torch.testing.assert_close(dm.cfg_combine(c, u, torch.tensor([0.0, 1.0, 2.0]))[1], c[1])
    with pytest.raises(ValueError, match="cond shape"):
        dm.cfg_combine(c, u[:2], 2.0)


def test_cfg_wrap_single_forward_and_negative_prompt():
    calls = []

    def model(x, level, emb, mode="a"):
        calls.append((x.shape[0], level.clone(), emb.clone(), mode))
        return x * level[:, None] + emb

    x = torch.randn(2, 3, generator=_gen(11))
    cond = {"emb": torch.ones(2, 3), "mode": "b"}
    neg = {"emb": -torch.ones(2, 3), "mode": "b"}
    guided = dm.cfg_wrap(model, 3.0, cond, neg)
    out = guided(x, torch.tensor([0.5, 2.0]))
    assert len(calls) == 1 and calls[0][0] == 4 and calls[0][3] == "b"
    assert calls[0][1].tolist() == [0.5, 2.0, 0.5, 2.0]
    c = model(x, torch.tensor([0.5, 2.0]), cond["emb"])
    u = model(x, torch.tensor([0.5, 2.0]), neg["emb"])
    torch.testing.assert_close(out, u + 3.0 * (c - u))
    # scalar level broadcasts to the batch
    guided(x, torch.tensor(1.0))
    assert calls[-1][1].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="cond keys"):
        dm.cfg_wrap(model, 2.0, cond, {"emb": -torch.ones(2, 3)})(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match="differs between cond and uncond"):
        dm.cfg_wrap(model, 2.0, cond, {"emb": -torch.ones(2, 3), "mode": "c"})(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match="must have batch 2"):
        dm.cfg_wrap(model, 2.0, {"emb": torch.ones(1, 3)}, {"emb": torch.ones(1, 3)})(x, torch.tensor(1.0))
