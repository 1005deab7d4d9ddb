"""sFID (Nash et al. 2021): the Fréchet distance on Inception's mixed_6/conv spatial features (first 7
channels of the 17 x 17 map, 2023-d, HWC order as ADM's evaluator flattens them), loaded from the
same pinned Inception file as FID (here a small TorchScript built locally with the TF port's layer
names), and the spatial part (mu_s / sigma_s) of ADM-style reference statistics."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch


class _Mixed6(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 9, 1)
        self.tower = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x)], 1)


class _TinyTfInception(torch.nn.Module):
    """clean-fid's TorchScript interface with the TF port's layer names: ``layers.conv`` ...
    ``layers.mixed_5`` (a 17 x 17 map from 299 x 299), ``layers.mixed_6.conv``, then a 2048-d pool."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(OrderedDict(
            conv=torch.nn.Conv2d(3, 8, 17, stride=17), mixed_5=torch.nn.ReLU(), mixed_6=_Mixed6(),
            pool=torch.nn.AdaptiveAvgPool2d(4), flat=torch.nn.Flatten(), fc=torch.nn.Linear(13 * 16, 2048)))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture
def pinned_inception(tmp_path, monkeypatch):
    from imagegen.evaluate import fid as FD
    from imagegen.hashing import file_sha256

    monkeypatch.setenv("IMAGEGEN_DATA_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv(FD.SHA256_ENV, raising=False)
    weights = FD.data_root_inception_dir() / FD.INCEPTION_TORCHSCRIPT_NAME
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    eager = _TinyTfInception().eval()
    torch.jit.save(torch.jit.script(eager), str(weights))
    weights.with_name(weights.name + ".sha256").write_text(file_sha256(weights) + "\n")
    return weights, eager


def _images(folder, n, seed):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_sfid_features_are_mixed6_conv_7_channels_hwc(pinned_inception, tmp_path):
    from imagegen.evaluate import fid as FD

    weights, eager = pinned_inception
    ext = FD.inception_spatial_extractor("clean", download=False)
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        got = ext(x)
        h = eager.layers.mixed_5(eager.layers.conv((x - 128) / 128))
        want = eager.layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert got.shape == (2, 7 * 17 * 17) == (2, 2023) and torch.allclose(got, want, atol=1e-5)
    feats = FD.clean_fid_features(_images(tmp_path / "g", 3, 0), mode="clean", model=ext, num_workers=0)
    assert feats.shape == (3, 2023)
    # the same trust rule as FID: a replaced file is refused before it is loaded
    torch.jit.save(torch.jit.script(_TinyTfInception().eval()), str(weights))
    with pytest.raises(FD.InceptionWeightsUntrustedError, match="replaced or damaged"):
        FD.inception_spatial_extractor("clean", download=False)
    with pytest.raises(ValueError, match="TorchScript port"):
        FD.inception_spatial_extractor("legacy_pytorch", download=False)


@pytest.mark.slow
def test_sfid_against_adm_style_reference_statistics(pinned_inception, tmp_path):
    """An ADM reference batch's mu/sigma (FID) and mu_s/sigma_s (sFID) imported from one .npz; evaluate
    computes both; a file without the spatial part gives FID and skips sFID with the reason."""
    from imagegen.evaluate import fid as FD
    from imagegen.evaluate.run import EvalRequest, evaluate
    from imagegen.importers.fid_stats import FidStatsError, import_fid_stats

    root = tmp_path / "root"
    gen_dir = _images(tmp_path / "gen", 10, 1)
    ref_dir = _images(tmp_path / "ref", 12, 2)
    pool = FD.clean_fid_features(ref_dir, mode="clean", num_workers=0, download=False)
    spatial_ext = FD.inception_spatial_extractor("clean", download=False)
    spatial = FD.clean_fid_features(ref_dir, mode="clean", model=spatial_ext, num_workers=0)
    gen_spatial = FD.clean_fid_features(gen_dir, mode="clean", model=spatial_ext, num_workers=0)
    np.savez(tmp_path / "VIRTUAL_tiny_labeled.npz", mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False), arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    card = import_fid_stats(root, tmp_path / "VIRTUAL_tiny_labeled.npz", "adm-tiny", mode="clean")
    assert card["spatial_dim"] == 2023 and len(card["spatial_stats_sha256"]) == 64
    # (a 2023-d or 2048-d Fréchet distance costs seconds to a minute here: each is computed once)
    res = evaluate(EvalRequest(folder=str(gen_dir), metrics=("sfid",), reference_stats="adm-tiny", n_resamples=0),
                   root)
    want = FD.frechet_distance(*FD.gaussian_stats(gen_spatial), spatial.mean(0), np.cov(spatial, rowvar=False))
    assert list(res["metrics"]) == ["sFID"] and res["metrics"]["sFID"] == pytest.approx(want, rel=1e-6)
    # mu/sigma only: FID computed, sFID skipped with the reason
    np.savez(tmp_path / "plain.npz", mu=pool.mean(0), sigma=np.cov(pool, rowvar=False))
    import_fid_stats(root, tmp_path / "plain.npz", "plain", mode="clean")
    res2 = evaluate(EvalRequest(folder=str(gen_dir), metrics=("fid", "sfid"), reference_stats="plain",
                                n_resamples=0), root)
    assert "FID" in res2["metrics"] and "no spatial statistics" in res2["skipped"]["sfid"]
    # spatial statistics of another size are refused at import
    np.savez(tmp_path / "bad.npz", mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=np.zeros(5),
             sigma_s=np.eye(5))
    with pytest.raises(FidStatsError, match="2023-d"):
        import_fid_stats(root, tmp_path / "bad.npz", "bad")
