"""Fréchet distance, KID, reference statistics, clean-fid features and image-folder checks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from imagegen.evaluate import fid as FD
from imagegen.evaluate.images import ImageFolderError, list_images


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ------------------------------------------------------------------------------ the distance


def test_fd_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 8)) * 3 + 1
    assert FD.fd_from_features(f, f) == pytest.approx(0.0, abs=1e-9)


def test_fd_grows_monotonically_with_noise():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(3000, 8))
    noise = rng.normal(size=f.shape)
    values = [FD.fd_from_features(f, f + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_fd_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    d = 7
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 4, size=d), rng.uniform(0.1, 4, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = FD.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_matches_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(3)
    for d in (2, 5, 12):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2)  # no disp=: SciPy 1.18 removed it
        expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
        assert FD.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
        # symmetric in its two Gaussians, though the computation is not
        assert FD.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_fd_is_finite_and_symmetric_on_singular_covariances():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(6, 20)), rng.normal(size=(6, 20)) + 0.5  # rank 5 in 20 dims
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FD.SmallSampleWarning)
        ma, sa = FD.gaussian_stats(a)
        mb, sb = FD.gaussian_stats(b)
    d1, d2 = FD.frechet_distance(ma, sa, mb, sb), FD.frechet_distance(mb, sb, ma, sa)
    assert np.isfinite(d1) and d1 > 0
    assert d1 == pytest.approx(d2, rel=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "differ in length: 3 vs 4"),
        ((np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), r"sigma1 must be a \(3, 3\)"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.triu(np.ones((3, 3)))), "sigma2 is not symmetric"),
        ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1 must be a non-empty 1-D"),
        ((np.array([0, np.nan, 0]), np.eye(3), np.zeros(3), np.eye(3)), "mu1 has NaN"),
    ],
)
def test_fd_shape_errors(args, message):
    with pytest.raises(ValueError, match=message):
        FD.frechet_distance(*args)


def test_gaussian_stats_warns_below_the_feature_dimension():
    rng = np.random.default_rng(5)
    with pytest.warns(FD.SmallSampleWarning, match=r"10 samples of 16-d.*at least 17 samples.*biased"):
        FD.gaussian_stats(rng.normal(size=(10, 16)))
    with pytest.warns(FD.SmallSampleWarning):
        FD.gaussian_stats(rng.normal(size=(16, 16)))  # n == d is still singular (rank 15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mu, sigma = FD.gaussian_stats(rng.normal(size=(17, 16)))
    assert mu.dtype == np.float64 and sigma.shape == (16, 16)
    with pytest.raises(ValueError, match="at least 2 samples"):
        FD.gaussian_stats(np.zeros((1, 4)))


# ---------------------------------------------------------------------------------------- KID


@pytest.mark.slow
def test_kid_zero_on_identical_sets_positive_when_shifted():
    rng = np.random.default_rng(6)
    f, g = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same_mean, _ = FD.kid(f, f.copy(), subsets=20, subset_size=200, seed=0)
    fresh_mean, _ = FD.kid(f, g, subsets=20, subset_size=200, seed=0)  # same distribution
    shifted_mean, shifted_std = FD.kid(f, f + 0.5, subsets=20, subset_size=200, seed=0)
    assert shifted_mean > 0 and shifted_mean > 10 * shifted_std
    # measured: same set -0.035, fresh draw 0.011, shift by 0.5 -> 1.02
    assert abs(same_mean) < 0.05 * shifted_mean
    assert abs(fresh_mean) < 0.05 * shifted_mean
    assert FD.kid(f, f + 0.5, subsets=20, subset_size=200, seed=0) == (shifted_mean, shifted_std)


def test_kid_equals_clean_fid_when_the_subset_is_the_whole_set():
    """With m = n the subset is a permutation of each set, so the estimate is deterministic."""
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(60, 10)), rng.normal(size=(60, 10)) * 1.3 + 0.2
    ours, std = FD.kid(a, b, subsets=3, subset_size=60)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert ours == pytest.approx(kernel_distance(a, b, num_subsets=1, max_subset_size=60), rel=1e-10)


def test_kid_caps_the_subset_size_with_a_warning():
    rng = np.random.default_rng(8)
    with pytest.warns(FD.SmallSampleWarning, match="subset_size 1000 capped at 50"):
        FD.kid(rng.normal(size=(50, 4)), rng.normal(size=(80, 4)), subsets=2)


def test_stats_hash_identifies_the_statistics():
    rng = np.random.default_rng(9)
    mu, sigma = rng.normal(size=4), _spd(rng, 4)
    h = FD.stats_hash(mu, sigma)
    assert len(h) == 64 and h == FD.stats_hash(mu.copy(), sigma.copy())
    bumped = sigma.copy()
    bumped[0, 0] += 1e-12
    assert FD.stats_hash(mu, bumped) != h
    assert FD.stats_hash(np.float32([1, 2]), np.eye(2, dtype=np.float32)) == FD.stats_hash([1.0, 2.0], np.eye(2))


def test_metric_name_never_calls_other_features_fid():
    assert FD.metric_name("inception") == "FID"
    assert FD.metric_name("CLIP-world-abc") == "FD-CLIP-world-abc"


# --------------------------------------------------------------------------- image folders


def _png(path: Path, size=(16, 16), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 50, 200)).save(path)
    return path


def test_list_images_sorted_recursive_and_errors(tmp_path):
    _png(tmp_path / "b.png")
    _png(tmp_path / "a.JPG".lower())
    _png(tmp_path / "sub" / "c.png", size=(20, 16))
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)] == [
        "a.jpg", "b.png", "sub/c.png"]
    with pytest.raises(ImageFolderError, match=r"a.jpg is 16x16, sub/c.png is 20x16"):
        list_images(tmp_path, recursive=True, same_size=True)

    empty = tmp_path / "empty"
    (empty / "inner").mkdir(parents=True)
    with pytest.raises(ImageFolderError, match="holds no images.*recursive=True"):
        list_images(empty)
    with pytest.raises(ImageFolderError, match="does not exist"):
        list_images(tmp_path / "nope")

    bad = tmp_path / "bad"
    _png(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageFolderError, match=r"broken.png: not a readable image"):
        list_images(bad)


# ---------------------------------------------------------------------- Inception weights


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow", "legacy_pytorch"])
def test_missing_inception_weights_fail_before_any_work(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # legacy_pytorch looks here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, url = FD.inception_weights(mode)
    if path.exists():
        pytest.skip(f"{path} exists on this machine: the missing-weights path cannot be shown")
    missing_folder = tmp_path / "never-created"  # reading it would raise a different error
    with pytest.raises(FD.InceptionWeightsMissingError) as err:
        FD.clean_fid_features(missing_folder, mode=mode)
    msg = str(err.value)
    assert str(path) in msg and url in msg and "copy it to" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(FD.InceptionWeightsMissingError, match="download=False"):
        FD.check_inception_weights(mode, download=False)
    with pytest.raises(FD.InceptionWeightsMissingError, match=str(path)):
        FD.reference_stats(missing_folder, None, mode, None, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_truncated_inception_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = FD.inception_weights("legacy_pytorch")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"<html>proxy error</html>")
    with pytest.raises(FD.InceptionWeightsMissingError, match="only 24 bytes"):
        FD.check_inception_weights("legacy_pytorch", download=False)


# ------------------------------------------------------- custom extractor through clean-fid


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory):
    from imagegen.world.scene import WorldConfig, render_scene

    folder = tmp_path_factory.mktemp("world-images")
    images = []
    for i in range(24):
        _, im = render_scene(WorldConfig(seed=4), i)
        im.save(folder / f"{i:03d}.png")
        images.append(im)
    return folder, images


@pytest.fixture(scope="module")
def tiny_clip_spec(tmp_path_factory):
    from _helpers import tiny_random_clip

    return tiny_random_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


def test_clip_extractor_through_clean_fid_matches_encode_images(world_folder, tiny_clip_spec, one_torch_thread):
    import torch

    from imagegen.clip import encode_images, load_clip

    folder, images = world_folder
    ext = FD.clip_image_extractor(tiny_clip_spec, normalize=True)
    assert ext.name.startswith("FD-CLIP-") and "FID" not in ext.name and ext.input_size == 64
    feats = FD.clean_fid_features(folder, model=ext, batch_size=10, num_workers=0)
    assert feats.shape == (24, 16)
    ref = encode_images(load_clip(tiny_clip_spec), images)
    np.testing.assert_allclose(feats, ref, atol=2e-5)
    # a non-square batch at another size is resized and cropped inside, as open_clip would
    out = ext(torch.rand(2, 3, 80, 100) * 255)
    assert out.shape == (2, 16)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ext(torch.rand(3, 64, 64))


def test_reference_stats_cached_as_npz_and_json(world_folder, tiny_clip_spec, tmp_path, one_torch_thread):
    folder, _ = world_folder
    ext = FD.clip_image_extractor(tiny_clip_spec)
    cache = tmp_path / "stats"
    mu, sigma, meta = FD.reference_stats(folder, None, "clean", None, cache, dataset_id="world-test",
                                         model=ext, num_workers=0)
    assert meta["cached"] is False and meta["extractor_id"] == ext.extractor_id
    assert meta["metric"] == ext.name and meta["n_used"] == 24 and meta["feature_dim"] == 16
    assert meta["stats_sha256"] == FD.stats_hash(mu, sigma)
    npz, js = cache / f"{meta['key']}.npz", cache / f"{meta['key']}.json"
    with np.load(npz, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["mu"], mu)
    assert json.loads(js.read_text())["dataset_id"] == "world-test"

    mu2, sigma2, meta2 = FD.reference_stats(folder, None, "clean", None, cache, dataset_id="world-test", model=ext)
    assert meta2["cached"] is True and meta2["key"] == meta["key"]
    np.testing.assert_array_equal(sigma2, sigma)

    _, _, sub = FD.reference_stats(folder, None, "clean", 20, cache, dataset_id="world-test", model=ext,
                                   num_workers=0)
    assert sub["key"] != meta["key"] and sub["n_used"] == 20 and sub["cached"] is False

    with pytest.raises(ValueError, match="only 24 images"):
        FD.reference_stats(folder, None, "clean", 30, cache, model=ext)
    with pytest.raises(ValueError, match="reserved for clean-fid's Inception"):
        FD.reference_stats(folder, "inception", "clean", None, cache, model=ext)
    with pytest.raises(ValueError, match="no model was given"):
        FD.reference_stats(folder, "CLIP-x", "clean", None, cache)

    js.write_text(json.dumps({**json.loads(js.read_text()), "stats_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="do not match the hash"):
        FD.reference_stats(folder, None, "clean", None, cache, dataset_id="world-test", model=ext)


class _TinyTorchscriptInception(torch.nn.Module):
    """clean-fid's TorchScript interface (``layers`` -> 2048-d pool), small and built here."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(),
                                          torch.nn.Linear(192, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_torchscript_inception_is_loaded_only_with_the_expected_sha256(tmp_path, monkeypatch):
    """Finding 8: the TorchScript file runs code when loaded, so it is checked against an expected
    sha256 first, refused on mismatch or when none is known, and may live under the data root."""
    from PIL import Image

    from imagegen.hashing import file_sha256

    monkeypatch.setenv("IMAGEGEN_DATA_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv(FD.SHA256_ENV, raising=False)
    weights = FD.data_root_inception_dir() / FD.INCEPTION_TORCHSCRIPT_NAME
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_TinyTorchscriptInception().eval()), str(weights))
    assert FD.inception_weights("clean")[0] == weights  # the data root's copy comes first
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")

    with pytest.raises(FD.InceptionWeightsUntrustedError, match="no expected sha256 is known"):
        FD.clean_fid_features(images, mode="clean", num_workers=0, download=False)
    monkeypatch.setenv(FD.SHA256_ENV, "0" * 64)
    with pytest.raises(FD.InceptionWeightsUntrustedError, match="expected 0000"):
        FD.clean_fid_features(images, mode="clean", num_workers=0, download=False)
    monkeypatch.delenv(FD.SHA256_ENV)
    weights.with_name(weights.name + ".sha256").write_text(file_sha256(weights) + "\n")
    feats = FD.clean_fid_features(images, mode="clean", num_workers=0, download=False)
    assert feats.shape == (4, 2048)
    # replaced after pinning: refused
    torch.manual_seed(1)
    torch.jit.save(torch.jit.script(_TinyTorchscriptInception().eval()), str(weights))
    with pytest.raises(FD.InceptionWeightsUntrustedError, match="replaced or damaged"):
        FD.check_inception_weights("clean", download=False)
