"""Imported FID reference statistics (.npz with mu/sigma, as clean-fid, pytorch-fid and ADM publish
them): checks, ids by file hash, and FID of a folder against them through evaluate()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _helpers import tiny_random_clip
from PIL import Image

from imagegen.importers.fid_stats import FidStatsError, get_fid_ref, import_fid_stats, load_fid_ref


def _stats(d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d + 5, d))
    return a.mean(0), np.cov(a, rowvar=False)


def test_import_is_idempotent_by_file_hash(tmp_path):
    mu, sigma = _stats(2048)
    f = tmp_path / "cifar10_legacy_tensorflow_train_32.npz"
    np.savez(f, mu=mu, sigma=sigma)
    card = import_fid_stats(tmp_path / "root", f, "cifar10-train", protocol="clean-fid legacy_tensorflow, train 50k",
                            mode="legacy_tensorflow")
    assert card["feature_dim"] == 2048 and card["extractor"] == "inception" and len(card["file_sha256"]) == 64
    assert card["id"] == card["file_sha256"][:16]
    again = import_fid_stats(tmp_path / "root", f, "another-name")
    assert again["id"] == card["id"]
    assert get_fid_ref(tmp_path / "root", "cifar10-train")["id"] == get_fid_ref(tmp_path / "root", "another-name")["id"]
    m2, s2, feats, c2 = load_fid_ref(tmp_path / "root", card["id"][:8])
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma) and feats is None and c2["mode"] == "legacy_tensorflow"
    # ADM-style reference batch: mu/sigma next to images and spatial statistics
    adm = tmp_path / "VIRTUAL_tiny_labeled.npz"
    mu_s, sigma_s = _stats(2023, 5)  # sFID's 7 x 17 x 17 spatial statistics
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    assert import_fid_stats(tmp_path / "root", adm)["arrays"] == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    with pytest.raises(LookupError, match="no FID reference 'nope'"):
        get_fid_ref(tmp_path / "root", "nope")


def test_bad_files_are_refused(tmp_path):
    root = tmp_path / "root"
    mu, sigma = _stats(2048)
    cases = {
        "pickled.npz": dict(mu=np.array([{"a": 1}], dtype=object), sigma=sigma),
        "nomu.npz": dict(m=mu, s=sigma),
        "shape.npz": dict(mu=mu, sigma=sigma[:10]),
        "asym.npz": dict(mu=mu, sigma=sigma + np.triu(np.ones_like(sigma))),
        "nan.npz": dict(mu=np.where(np.arange(2048) == 3, np.nan, mu), sigma=sigma),
        "small.npz": dict(mu=mu[:16], sigma=sigma[:16, :16]),
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    with pytest.raises(FidStatsError, match="without pickle"):
        import_fid_stats(root, tmp_path / "pickled.npz")
    with pytest.raises(FidStatsError, match=r"has arrays \['m', 's'\], not 'mu' and 'sigma'"):
        import_fid_stats(root, tmp_path / "nomu.npz")
    card = import_fid_stats(root, tmp_path / "nomu.npz", "renamed", mu_key="m", sigma_key="s")
    assert card["mu_key"] == "m"
    with pytest.raises(FidStatsError, match=r"must be a \(2048, 2048\) covariance"):
        import_fid_stats(root, tmp_path / "shape.npz")
    with pytest.raises(FidStatsError, match="not symmetric"):
        import_fid_stats(root, tmp_path / "asym.npz")
    with pytest.raises(FidStatsError, match="NaN or inf"):
        import_fid_stats(root, tmp_path / "nan.npz")
    with pytest.raises(FidStatsError, match="Inception pool features are 2048-d"):
        import_fid_stats(root, tmp_path / "small.npz")
    (tmp_path / "text.npz").write_text("mu,sigma\n")
    with pytest.raises(FidStatsError, match="not an .npz archive"):
        import_fid_stats(root, tmp_path / "text.npz")
    with pytest.raises(FidStatsError, match="does not exist"):
        import_fid_stats(root, tmp_path / "missing.npz")


def _crops(folder: Path, seed: int, n: int = 24) -> Path:
    """n 32 x 32 crops of scikit-learn's bundled photographs (real images no one here made)."""
    sk = pytest.importorskip("sklearn.datasets")
    photos = [np.asarray(Image.open(Path(sk.__file__).parent / "images" / f).convert("RGB"))
              for f in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        p = photos[i % 2]
        y, x = rng.integers(0, p.shape[0] - 64), rng.integers(0, p.shape[1] - 64)
        Image.fromarray(p[y:y + 64:2, x:x + 64:2]).save(folder / f"{i:03d}.png")
    return folder


def test_evaluate_folder_against_imported_statistics(tmp_path, one_torch_thread):
    from imagegen.evaluate.fid import clean_fid_features, clip_image_extractor, fd_from_features, kid
    from imagegen.evaluate.run import EvalError, EvalRequest, evaluate

    root = tmp_path / "root"
    spec = tiny_random_clip(tmp_path / "clip")
    gen_dir, ref_dir = _crops(tmp_path / "gen", 1), _crops(tmp_path / "ref", 2)
    ext = clip_image_extractor(spec)
    ref = clean_fid_features(ref_dir, model=ext, num_workers=0)
    gen = clean_fid_features(gen_dir, model=ext, num_workers=0)
    np.savez(tmp_path / "ref_stats.npz", mu=ref.mean(0), sigma=np.cov(ref, rowvar=False))
    np.savez(tmp_path / "ref_kid.npz", feats=ref)  # clean-fid's *_kid.npz layout
    import_fid_stats(root, tmp_path / "ref_stats.npz", "crops", extractor=spec, mode="clean", protocol="test crops")
    import_fid_stats(root, tmp_path / "ref_kid.npz", "crops-kid", extractor=spec)

    res = evaluate(EvalRequest(folder=str(gen_dir), metrics=("fid", "kid"), reference_stats="crops"), root)
    name = next(iter(res["metrics"]))
    assert name.startswith("FD-CLIP") and res["metrics"][name] == pytest.approx(fd_from_features(gen, ref), rel=1e-4)
    np.savez(tmp_path / "self.npz", mu=gen.mean(0), sigma=np.cov(gen, rowvar=False))
    import_fid_stats(root, tmp_path / "self.npz", "self", extractor=spec)
    own = evaluate(EvalRequest(folder=str(gen_dir), metrics=("fid",), reference_stats="self"), root)["metrics"][name]
    assert own < 1e-3 * res["metrics"][name]  # against its own statistics: ~0
    assert "mu/sigma only" in res["skipped"]["kid"]
    import pandas as pd

    row = pd.read_parquet(res["metrics_file"]).iloc[0]
    assert row["reference_stats_name"] == "crops" and row["reference_stats_protocol"] == "test crops"
    assert len(row["reference_stats_file_sha256"]) == 64

    res2 = evaluate(EvalRequest(folder=str(gen_dir), metrics=("fid", "kid"), reference_stats="crops-kid",
                                kid_subsets=5, kid_subset_size=10), root)
    kd = [m for m in res2["metrics"] if m.startswith("KD-")]
    assert kd and res2["metrics"][kd[0]] == pytest.approx(kid(gen, ref, subsets=5, subset_size=10, seed=0)[0], rel=1e-4)

    with pytest.raises(EvalError, match="clean-fid mode 'clean'"):
        evaluate(EvalRequest(folder=str(gen_dir), metrics=("fid",), reference_stats="crops",
                             fid_mode="legacy_pytorch"), root)
    with pytest.raises(EvalError, match="would compare other features"):
        evaluate(EvalRequest(folder=str(gen_dir), metrics=("fid",), reference_stats="crops", extractor="inception"),
                 root)
    with pytest.raises(LookupError, match="no FID reference"):
        evaluate(EvalRequest(folder=str(gen_dir), metrics=("fid",), reference_stats="unknown"), root)


def test_cli_import_fid_stats(tmp_path, capsys):
    from imagegen.cli import main

    mu, sigma = _stats(2048, 3)
    np.savez(tmp_path / "fid_stats_cifar10_train.npz", mu=mu, sigma=sigma)
    assert main(["import", "fid-stats", str(tmp_path / "fid_stats_cifar10_train.npz"), "--name", "ttur-cifar10",
                 "--protocol", "TTUR / pytorch-fid CIFAR-10 train", "--data-root", str(tmp_path / "r"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["name"] == "ttur-cifar10" and out["feature_dim"] == 2048


def test_imported_dataset_is_an_fid_reference(tmp_path, one_torch_thread):
    """An imported folder of non-square photos serves as evaluate()'s reference dataset (decoded and
    centre-cropped by the training loader's path)."""
    from imagegen.evaluate.run import EvalRequest, evaluate
    from imagegen.importers import ImportConfig, import_dataset

    sk = pytest.importorskip("sklearn.datasets")
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in ("china.jpg", "flower.jpg"):
        im = Image.open(Path(sk.__file__).parent / "images" / f)
        for i in range(6):  # non-square tiles of the real photographs
            im.crop((i * 40, i * 20, i * 40 + 96, i * 20 + 64)).save(photos / f"{Path(f).stem}-{i}.png")
    root = tmp_path / "root"
    import_dataset(ImportConfig(kind="folder", source=str(photos), name="tiles"), root)
    gen = _crops(tmp_path / "gen", 3, n=12)
    spec = tiny_random_clip(tmp_path / "clip")
    res = evaluate(EvalRequest(folder=str(gen), metrics=("fid", "kid"), reference="tiles", extractor=spec,
                               kid_subsets=3, kid_subset_size=6), root)
    assert {m[:3] for m in res["metrics"]} == {"FD-", "KD-"} and all(np.isfinite(v) for v in res["metrics"].values())
    ref_dir = next((root / "evals" / "reference").glob("*-32px"))
    assert len(list(ref_dir.glob("*.png"))) == 12 and Image.open(next(ref_dir.glob("*.png"))).size == (32, 32)
