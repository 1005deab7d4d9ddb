"""The statistical metrics against independent computations: CMMD by hand, precision/recall/density/
coverage on Gaussians with known overlap and against the ``prdc`` package, Inception Score against
a hand-written loop and torch-fidelity, bootstrap coverage on synthetic data, sample-count flags."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from imagegen.evaluate import bootstrap as B
from imagegen.evaluate import cmmd as C
from imagegen.evaluate import inception_score as IS
from imagegen.evaluate import prdc as P
from imagegen.evaluate.fid import SmallSampleWarning, fd_from_features, kid

# --------------------------------------------------------------------------------------- CMMD


def _hand_mmd(x, y, sigma, unbiased):
    """Double loops over the pairs, straight from the definition."""
    def k(a, b):
        return math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b)) / (2 * sigma ** 2))

    m, n = len(x), len(y)
    if unbiased:
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    else:
        xx = sum(k(a, b) for a in x for b in x) / m ** 2
        yy = sum(k(a, b) for a in y for b in y) / n ** 2
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_matches_a_hand_computation():
    x = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]
    y = [[3.0, 1.0], [2.0, 2.0], [0.0, -1.0], [1.5, 0.0]]
    for sigma in (1.0, 10.0):
        assert C.mmd2_rbf(x, y, sigma) == pytest.approx(_hand_mmd(x, y, sigma, True), rel=1e-12)
        assert C.mmd2_rbf(x, y, sigma, "reference") == pytest.approx(_hand_mmd(x, y, sigma, False), rel=1e-12)
    # cmmd normalises and scales by 1000
    xn = np.asarray(x) / np.linalg.norm(x, axis=1, keepdims=True)
    yn = np.asarray(y) / np.linalg.norm(y, axis=1, keepdims=True)
    assert C.cmmd(x, y) == pytest.approx(1000 * _hand_mmd(xn.tolist(), yn.tolist(), 10.0, True), rel=1e-10)


def test_cmmd_unbiased_is_zero_on_average_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    same = [C.cmmd(rng.normal(size=(60, 8)), rng.normal(size=(60, 8))) for _ in range(40)]
    assert abs(np.mean(same)) < 3 * np.std(same) / math.sqrt(len(same))  # unbiased: mean ~ 0
    assert min(same) < 0  # the U-statistic can be negative; the V-statistic cannot
    base = rng.normal(size=(200, 8))
    d = [C.cmmd(base, rng.normal(size=(200, 8)) + s * np.eye(8)[0]) for s in (0.0, 0.5, 1.0, 2.0)]
    assert d == sorted(d) and d[-1] > 10 * abs(d[0])
    with pytest.raises(ValueError, match="embedding width"):
        C.cmmd(np.ones((3, 2)), np.ones((3, 4)))


def test_cmmd_images_through_open_clip(tmp_path):
    from _helpers import tiny_random_clip
    from PIL import Image

    spec = tiny_random_clip(tmp_path / "clip")
    rng = np.random.default_rng(1)
    ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    out = C.cmmd_images(spec, ims[:3], ims[3:], batch_size=2)
    emb = out["embeddings"]
    assert out["value"] == pytest.approx(C.cmmd(emb["generated"], emb["reference"]))
    assert np.allclose(np.linalg.norm(emb["generated"], axis=1), 1, atol=1e-5)
    assert out["clip"]["weights_sha256"] and out["sigma"] == 10.0 and out["n_generated"] == 3


# ---------------------------------------------------------------------------------------- PRDC


def test_prdc_matches_the_prdc_package():
    prdc_pkg = pytest.importorskip("prdc")
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 16)), rng.normal(size=(250, 16)) * 1.2 + 0.3
    ours = P.prdc(real, fake, k=3, block=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = prdc_pkg.compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-12), key


def test_prdc_on_gaussians_with_known_overlap():
    rng = np.random.default_rng(3)
    d, n = 8, 1000
    far = 50.0 * np.eye(d)[0]
    real = rng.normal(size=(n, d))
    # the same distribution: everything near 1 (density's expectation is 1)
    same = P.prdc(real, rng.normal(size=(n, d)))
    assert min(same["precision"], same["recall"], same["coverage"]) > 0.8
    assert same["density"] == pytest.approx(1.0, abs=0.15)
    # disjoint supports: everything 0
    apart = P.prdc(real, rng.normal(size=(n, d)) + far)
    assert apart["precision"] == apart["recall"] == apart["density"] == apart["coverage"] == 0.0
    # 30% of the generated samples off the real support: precision and density drop to ~0.7
    mixed = np.concatenate([rng.normal(size=(700, d)), rng.normal(size=(300, d)) + far])
    m = P.prdc(real, mixed)
    assert m["precision"] == pytest.approx(0.7 * same["precision"], abs=0.05)
    assert m["density"] == pytest.approx(0.7 * same["density"], abs=0.1)
    # mode dropping: real has two modes, generated only one -> recall and coverage ~0.5, precision high
    two = np.concatenate([rng.normal(size=(500, d)), rng.normal(size=(500, d)) + far])
    dropped = P.prdc(two, rng.normal(size=(n, d)))
    assert dropped["precision"] > 0.8
    # the dropped mode (half the real samples) is never reached; the kept one as in the same-distribution case
    assert dropped["recall"] <= 0.5 and dropped["recall"] == pytest.approx(0.5 * same["recall"], abs=0.05)
    assert 0.4 <= dropped["coverage"] <= 0.5


def test_prdc_errors():
    with pytest.raises(ValueError, match="need at least 4"):
        P.prdc(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="feature width"):
        P.prdc(np.zeros((10, 2)), np.zeros((10, 3)))


# ---------------------------------------------------------------------------------- Inception Score


def _hand_is(logits, splits):
    scores = []
    n = len(logits)
    for s in range(splits):
        part = logits[s * n // splits:(s + 1) * n // splits]
        probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in part]
        py = [sum(p[c] for p in probs) / len(probs) for c in range(len(probs[0]))]
        kl = sum(sum(p[c] * (math.log(p[c]) - math.log(py[c])) for c in range(len(py))) for p in probs) / len(probs)
        scores.append(math.exp(kl))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


def test_inception_score_formula_against_a_loop_and_closed_forms():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(53, 7)) * 3
    mean, std = IS.inception_score_from_logits(logits, splits=10)
    hm, hs = _hand_is(logits.tolist(), 10)
    assert mean == pytest.approx(hm, rel=1e-10) and std == pytest.approx(hs, rel=1e-8)
    # closed forms: one-hot predictions spread evenly over C classes -> IS = C; all alike -> IS = 1
    onehot = np.eye(5)[np.arange(100) % 5]
    assert IS.inception_score_from_probs(onehot, splits=10)[0] == pytest.approx(5.0, rel=1e-9)
    assert IS.inception_score_from_probs(np.full((40, 5), 0.2), splits=4) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="sum to 1"):
        IS.inception_score_from_probs(np.abs(logits))


def test_inception_score_matches_torch_fidelity():
    metric_isc = pytest.importorskip("torch_fidelity.metric_isc")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 1008)).astype(np.float32) * 4
    theirs = metric_isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    mean, std = IS.inception_score_from_logits(logits, splits=10)
    assert mean == pytest.approx(theirs[metric_isc.KEY_METRIC_ISC_MEAN], rel=1e-9)
    assert std == pytest.approx(theirs[metric_isc.KEY_METRIC_ISC_STD], rel=1e-6)


def test_inception_score_refuses_without_weights(monkeypatch, tmp_path):
    from imagegen.evaluate import fid

    monkeypatch.setattr(fid, "inception_weights", lambda mode: (tmp_path / "inception-2015-12-05.pt", "https://x"))
    with pytest.raises(fid.InceptionWeightsMissingError, match="inception-2015-12-05.pt"):
        IS.inception_score(tmp_path, download=False)


class _TinyTFInception(torch.nn.Module):
    """The interface of clean-fid's torchscript (``layers`` -> 2048-d pool, ``output`` 2048 -> 1008)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(),
                                          torch.nn.Linear(192, 2048))
        self.output = torch.nn.Linear(2048, 1008)


def test_inception_logits_through_clean_fids_data_path(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    torch.manual_seed(0)
    scripted = torch.jit.script(_TinyTFInception().eval())
    path = tmp_path / "tiny.pt"
    torch.jit.save(scripted, str(path))
    net = IS.InceptionLogits(torch.jit.load(str(path)))
    out = IS.inception_score(tmp_path, model=net, splits=3, num_workers=0, batch_size=5)
    assert out["logits"].shape == (12, 1008) and out["n"] == 12 and out["weights"] is None
    # the logits are the unbiased ones: features @ W^T, no bias
    x = torch.rand(2, 3, 299, 299) * 255
    feats = scripted.layers((x - 128) / 128)
    assert torch.allclose(net(x), feats @ scripted.output.weight.T, atol=1e-5)
    assert out["mean"] == pytest.approx(IS.inception_score_from_logits(out["logits"], 3)[0])


# ----------------------------------------------------------------------------------- bootstrap


def test_bootstrap_mean_interval_covers_the_true_mean_at_about_the_stated_rate():
    rng = np.random.default_rng(0)
    trials, hits = 400, 0
    for t in range(trials):
        x = rng.exponential(2.0, size=80)  # skewed on purpose; true mean 2
        ci = B.bootstrap_mean_ci(x, n_resamples=400, confidence=0.9, seed=t)
        hits += ci.contains(2.0)
    rate = hits / trials
    # 90% nominal; the percentile bootstrap of a skewed mean at n = 80 runs a little below
    assert 0.84 <= rate <= 0.95, rate


@pytest.mark.slow
def test_bootstrap_ci_of_a_two_set_metric_covers_at_about_the_stated_rate():
    """Unbiased MMD^2 between two sets (resampling both) around its population value."""
    rng = np.random.default_rng(1)
    shift = 1.0 * np.eye(2)[0]
    # population MMD^2 for N(0, I) vs N(shift, I) with an RBF kernel of bandwidth s, d = 2:
    # 2 (s^2/(s^2+2)) (1 - exp(-|shift|^2 / (2 (s^2 + 2))))
    s = 1.0
    true = 2 * (s * s / (s * s + 2)) * (1 - math.exp(-1.0 / (2 * (s * s + 2))))
    trials, hits = 120, 0
    for t in range(trials):
        x, y = rng.normal(size=(60, 2)), rng.normal(size=(60, 2)) + shift
        ci = B.bootstrap_ci(lambda a, b: C.mmd2_rbf(a, b, sigma=s), x, y, n_resamples=150, confidence=0.9, seed=t)
        hits += ci.contains(true)
    assert 0.78 <= hits / trials <= 0.98, hits / trials


def test_bootstrap_records_its_settings_and_is_repeatable():
    rng = np.random.default_rng(2)
    g, r = rng.normal(size=(40, 3)), rng.normal(size=(50, 3))
    a = B.bootstrap_ci(fd_from_features, g, r, n_resamples=50, seed=7)
    b = B.bootstrap_ci(fd_from_features, g, r, n_resamples=50, seed=7)
    assert a == b and a.n_resamples == 50 and a.resampled == "generated+reference"
    assert a.low <= a.high and a.n_generated == 40 and a.n_reference == 50
    assert a.value == pytest.approx(fd_from_features(g, r))
    only_gen = B.bootstrap_ci(fd_from_features, g, r, n_resamples=50, seed=7, resample_reference=False)
    assert only_gen.resampled == "generated" and only_gen.as_dict()["method"] == "percentile"
    with pytest.raises(ValueError, match="confidence"):
        B.bootstrap_mean_ci([1.0, 2.0], confidence=1.5)


def test_sample_count_flags_say_how_many_are_needed():
    flags = B.sample_count_flags("fd", 500, 3000, dim=1024)
    assert len(flags) == 1 and "generated set" in flags[0] and "at least 1025" in flags[0]
    assert B.sample_count_flags("fd", 5000, 5000, dim=1024) == []
    kidf = B.sample_count_flags("kid", 400, 2000, subset_size=1000)
    assert len(kidf) == 1 and "at least 1000" in kidf[0]
    assert "at least 4" in B.sample_count_flags("knn", 3, 10)[0]
    assert "at least 20" in B.sample_count_flags("is", 12, splits=10)[0]
    with pytest.warns(SmallSampleWarning, match="at least 65"):
        B.warn_sample_counts("fd", 64, 100, dim=64)
    # the flags agree with what the metrics themselves warn about
    with pytest.warns(SmallSampleWarning, match="capped"):
        kid(np.random.default_rng(0).normal(size=(30, 4)), np.random.default_rng(1).normal(size=(40, 4)),
            subsets=2, subset_size=50)
