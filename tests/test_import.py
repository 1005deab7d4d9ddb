"""imagegen import on real images no one here made: scikit-learn's bundled photos and digits, and
scikit-image's bundled photos (JPEG, gray/RGB/RGBA PNG, GIF, TIFF; square and not)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen.importers import ImportConfig, ImportError_, import_dataset
from imagegen.registry import get_dataset

skimage = pytest.importorskip("skimage")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

SK_IMAGES = Path(sklearn_datasets.__file__).parent / "images"
SKI_DATA = Path(skimage.__file__).parent / "data"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _members(shards: list[Path]) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for s in shards:
        with tarfile.open(s) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request log on stderr
        pass


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Two class folders of real photos, captions from captions.jsonl, a sidecar .txt, or the class."""
    root = tmp_path_factory.mktemp("folder") / "photos"
    (root / "photo").mkdir(parents=True)
    (root / "drawing").mkdir()
    for src in (SK_IMAGES / "china.jpg", SK_IMAGES / "flower.jpg", SKI_DATA / "rocket.jpg",
                SKI_DATA / "chelsea.png", SKI_DATA / "coffee.png"):
        shutil.copy(src, root / "photo" / src.name)
    for src in (SKI_DATA / "camera.png", SKI_DATA / "logo.png", SKI_DATA / "no_time_for_that_tiny.gif",
                SKI_DATA / "multipage.tif"):
        shutil.copy(src, root / "drawing" / src.name)
    (root / "drawing" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "photo" / "notes.md").write_text("not an image, not an input row")
    (root / "photo" / "rocket.txt").write_text("a rocket on its launch pad\n")
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file": "photo/china.jpg", "caption": "a temple in china"},
        {"file": "photo/flower.jpg", "caption": "a pink flower"},
        {"file": "drawing/logo.png", "caption": "the scikit-image logo"}]) + "\n")
    return root


def test_folder_round_trip(tmp_path, photo_folder):
    root = tmp_path / "data"
    res = import_dataset(ImportConfig(kind="folder", source=str(photo_folder), name="photos"), root)
    assert not res.cached
    ds = get_dataset(root, "photos")
    assert ds.card["source"]["kind"] == "import" and ds.card["curated"] is False
    assert ds.card["classes"] == ["drawing", "photo"]
    acc = pd.read_parquet(ds.path / "accounting.parquet")
    assert len(acc) == 10  # every image file is a row; notes.md and captions.jsonl are not
    assert acc["outcome"].value_counts().to_dict() == {"kept": 9, "skipped:undecodable_image": 1}
    assert acc.loc[acc["outcome"] != "kept", "url"].tolist() == ["drawing/broken.png"]

    man = pd.read_parquet(ds.path / "manifest.parquet").set_index("source")
    assert man.loc["photo/china.jpg", "caption"] == "a temple in china"
    assert man.loc["photo/rocket.jpg", "caption"] == "a rocket on its launch pad"  # sidecar
    assert man.loc["photo/coffee.png", "caption"] == "photo"  # the class name
    assert man.loc["drawing/logo.png", "label"] == "drawing" and man.loc["photo/china.jpg", "label_index"] == 1
    members = _members(ds.shards)
    assert len(members) == 9
    for rel, row in man.iterrows():
        orig = (photo_folder / rel).read_bytes()
        stored = members[row["key"]]
        ext = next(e for e in stored if e in ("jpg", "png"))
        im = Image.open(photo_folder / rel)
        assert (row["original_width"], row["original_height"]) == im.size  # kept at its size
        assert json.loads(stored["json"])["label"] == row["label"]
        assert stored["txt"].decode() == row["caption"]
        if rel.endswith((".jpg", ".png")):  # JPEG/PNG: the very bytes
            assert not row["reencoded"] and stored[ext] == orig and row["sha256"] == _sha(orig)
        else:  # GIF/TIFF: one lossless PNG, same pixels
            assert row["reencoded"] and ext == "png"
            back = np.asarray(Image.open(io.BytesIO(stored[ext])))
            im.seek(0)
            assert np.array_equal(back, np.asarray(im.convert(Image.open(io.BytesIO(stored[ext])).mode)))
    assert ds.card["image_sizes"]["square"] is False
    assert man.loc["photo/china.jpg", "original_width"] == 640 and man.loc["photo/china.jpg", "original_height"] == 427

    # the training loader reads it (resized to a square) and the run layer sees the labels
    from imagegen.loader import make_dataset

    got = list(make_dataset(ds.shards, image_size=32, shuffle_buffer=0))
    assert len(got) == 9 and all(tuple(s["image"].shape) == (3, 32, 32) for s in got)

    # same content elsewhere: same id, served from the registry
    moved = tmp_path / "moved"
    shutil.copytree(photo_folder, moved)
    again = import_dataset(ImportConfig(kind="folder", source=str(moved), name="photos2"), root)
    assert again.cached and again.dataset_id == res.dataset_id
    # changed content: a new id
    (moved / "photo" / "coffee.png").unlink()
    third = import_dataset(ImportConfig(kind="folder", source=str(moved)), root)
    assert third.dataset_id != res.dataset_id and third.counts["shard"]["samples"] == 8


def test_folder_without_images_and_bad_captions(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("hello")
    with pytest.raises(ImportError_, match="holds no images"):
        import_dataset(ImportConfig(kind="folder", source=str(empty)), tmp_path / "data")
    with pytest.raises(ImportError_, match="does not exist"):
        import_dataset(ImportConfig(kind="folder", source=str(tmp_path / "nope")), tmp_path / "data")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(SK_IMAGES / "china.jpg", flat / "china.jpg")
    (flat / "captions.jsonl").write_text('{"file": "missing.jpg", "caption": "x"}\n')
    with pytest.raises(ImportError_, match="missing.jpg"):
        import_dataset(ImportConfig(kind="folder", source=str(flat)), tmp_path / "data")
    (flat / "captions.jsonl").unlink()
    with pytest.raises(ImportError_, match="outside any class folder"):
        import_dataset(ImportConfig(kind="folder", source=str(flat), labels="subfolders"), tmp_path / "data")
    with pytest.raises(ValueError, match="apply to kind='hf' only"):
        ImportConfig(kind="folder", source=str(flat), image_column="image")


def _digits_dataset(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    import datasets

    digits = sklearn_datasets.load_digits()
    n = 60
    pix = (digits.images[:n] * 255 / 16).round().astype(np.uint8)  # 8x8, 0..16 -> 0..255
    labels = digits.target[:n]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
                               "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pix], "label": labels.tolist(),
                                     "text": [f"a handwritten {d}" for d in labels]}, features=feats)
    path = tmp_path / "digits_hf"
    ds.save_to_disk(str(path))
    return path, pix, labels


def test_hf_dataset_round_trip(tmp_path):
    path, pix, labels = _digits_dataset(tmp_path)
    root = tmp_path / "data"
    res = import_dataset(ImportConfig(kind="hf", source=str(path), image_column="image", label_column="label",
                                      caption_column="text", name="digits"), root)
    ds = get_dataset(root, "digits")
    assert ds.card["classes"] == [str(i) for i in range(10)] and ds.card["source"]["how"] == "load_from_disk"
    man = pd.read_parquet(ds.path / "manifest.parquet").sort_values("row_id")
    assert len(man) == 60 and res.counts["shard"]["samples"] == 60
    assert man["label"].tolist() == [str(v) for v in labels]
    assert man["caption"].tolist() == [f"a handwritten {d}" for d in labels]
    members = _members(ds.shards)
    for (_, row), want in zip(man.iterrows(), pix):
        got = np.asarray(Image.open(io.BytesIO(members[row["key"]]["png"])))
        assert np.array_equal(got, want)  # stored bytes of the Image feature, no re-encode
        assert not row["reencoded"] and (row["original_width"], row["original_height"]) == (8, 8)
    # captions from the labels when no caption column is named
    res2 = import_dataset(ImportConfig(kind="hf", source=str(path), image_column="image", label_column="label"), root)
    man2 = pd.read_parquet(Path(res2.path) / "manifest.parquet").sort_values("row_id")
    assert man2["caption"].tolist() == [str(v) for v in labels]
    assert res2.dataset_id != res.dataset_id


def test_hf_dataset_bad_columns(tmp_path):
    path, _, _ = _digits_dataset(tmp_path)
    with pytest.raises(ImportError_, match=r"no image column 'img'; its columns are \['image', 'label', 'text'\]"):
        import_dataset(ImportConfig(kind="hf", source=str(path), image_column="img"), tmp_path / "data")
    with pytest.raises(ImportError_, match="no caption column 'caption'"):
        import_dataset(ImportConfig(kind="hf", source=str(path), image_column="image", caption_column="caption"),
                       tmp_path / "data")
    with pytest.raises(ImportError_, match="no label column"):
        import_dataset(ImportConfig(kind="hf", source=str(path), image_column="image", label_column="y"),
                       tmp_path / "data")
    with pytest.raises(ImportError_, match="not an image"):  # a column that holds no images
        import_dataset(ImportConfig(kind="hf", source=str(path), image_column="text"), tmp_path / "data")
    with pytest.raises(ValueError, match="needs image_column"):
        ImportConfig(kind="hf", source=str(path))
    # a name that is not in the cache, offline (conftest sets HF_HUB_OFFLINE=1): refused, named
    with pytest.raises(ImportError_, match="cannot open Hugging Face dataset 'no-such-dataset-xyz'"):
        import_dataset(ImportConfig(kind="hf", source="no-such-dataset-xyz", image_column="img"), tmp_path / "data")


def test_webdataset_round_trip_from_img2dataset_layout(tmp_path, photo_folder):
    """A dataset's shard folder (img2dataset's layout) re-imported: same bytes, captions, json fields."""
    root = tmp_path / "data"
    first = get_dataset(root, import_dataset(ImportConfig(kind="folder", source=str(photo_folder),
                                                          shard={"target_shard_size": 4}), root).dataset_id)
    res = import_dataset(ImportConfig(kind="webdataset", source=str(first.path / "shards"), label_field="label",
                                      name="rewds"), root)
    ds = get_dataset(root, "rewds")
    assert res.counts["shard"]["samples"] == 9 and res.counts["reencoded"] == 0
    a, b = _members(first.shards), _members(ds.shards)
    man = pd.read_parquet(ds.path / "manifest.parquet")
    assert set(man["source_key"]) == set(a)  # re-keyed; the old key kept
    for _, row in man.iterrows():
        old, new = a[row["source_key"]], b[row["key"]]
        ext = next(e for e in new if e in ("jpg", "png"))
        assert new[ext] == old[ext] and new["txt"] == old["txt"]  # no re-encode
        assert json.loads(new["json"])["source_meta"]["source"] == json.loads(old["json"])["source"]
        assert row["label"] == json.loads(old["json"])["label"]
    assert ds.card["classes"] == ["drawing", "photo"]


def test_webdataset_by_url_pattern_and_bad_tars(tmp_path, photo_folder):
    root = tmp_path / "data"
    first = get_dataset(root, import_dataset(ImportConfig(kind="folder", source=str(photo_folder),
                                                          shard={"target_shard_size": 4}), root).dataset_id)
    serve_dir = tmp_path / "www"
    shutil.copytree(first.path / "shards", serve_dir)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(serve_dir)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{{00000..00002}}.tar"
        res = import_dataset(ImportConfig(kind="webdataset", source=url), root)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert res.counts["shard"]["samples"] == 9
    assert get_dataset(root, res.dataset_id).card["source"]["shards"][0].startswith("http://127.0.0.1:")

    # not a WebDataset: a tar of loose files without images
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("README", b"hello"), ("data.csv", b"a,b\n1,2\n")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    with pytest.raises(ImportError_, match="not a WebDataset shard of images: no sample has an image member"):
        import_dataset(ImportConfig(kind="webdataset", source=str(bad)), root)
    notatar = tmp_path / "x.tar"
    notatar.write_bytes(os.urandom(3000))
    with pytest.raises(ImportError_, match="is not a tar archive"):
        import_dataset(ImportConfig(kind="webdataset", source=str(notatar)), root)
    with pytest.raises(ImportError_, match="'pipe:' sources run a shell command"):
        import_dataset(ImportConfig(kind="webdataset", source="pipe:curl -s http://127.0.0.1/a.tar"), root)
    with pytest.raises(ImportError_, match=r"only http\(s\):// and file:// URLs"):
        import_dataset(ImportConfig(kind="webdataset", source="s3://bucket/shard-{0..3}.tar"), root)
    with pytest.raises(ImportError_, match="matches no file"):
        import_dataset(ImportConfig(kind="webdataset", source=str(tmp_path / "none-*.tar")), root)
    # a sample without an image inside a good shard is a recorded skip, not an error
    mixed = tmp_path / "mixed.tar"
    with tarfile.open(mixed, "w") as tar:
        for name, data in (("a.jpg", (SK_IMAGES / "china.jpg").read_bytes()), ("a.txt", b"china"),
                           ("b.txt", b"caption without an image")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    res = import_dataset(ImportConfig(kind="webdataset", source=str(mixed)), root)
    assert res.counts["accounting"] == {"kept": 1, "skipped:no_image": 1}


def test_curate_runs_dedup_and_filter(tmp_path, photo_folder):
    folder = tmp_path / "dups"
    shutil.copytree(photo_folder, folder)
    shutil.copy(folder / "photo" / "china.jpg", folder / "photo" / "china_copy.jpg")
    root = tmp_path / "data"
    res = import_dataset(ImportConfig(kind="folder", source=str(folder), curate=True,
                                      filter={"clip_score": None, "min_side": 40}), root)
    ds = get_dataset(root, res.dataset_id)
    assert ds.card["curated"] is True and set(ds.card["stage_ids"]) == {"import", "dedup", "filter"}
    acc = pd.read_parquet(ds.path / "accounting.parquet").set_index("url")
    outcomes = acc["outcome"].to_dict()
    assert sorted([outcomes["photo/china.jpg"], outcomes["photo/china_copy.jpg"]]) == ["filtered:exact_duplicate", "kept"]
    assert outcomes["drawing/no_time_for_that_tiny.gif"] == "filtered:min_side"  # 14 x 25 px, below 40
    assert outcomes["drawing/broken.png"] == "skipped:undecodable_image"
    assert len(acc) == 11 and (acc["outcome"] == "kept").sum() == ds.card["counts"]["shard"]["samples"]
    man = pd.read_parquet(ds.path / "manifest.parquet")
    assert "phash" in man.columns
    plain = import_dataset(ImportConfig(kind="folder", source=str(folder)), root)
    assert plain.dataset_id != res.dataset_id and plain.counts["shard"]["samples"] == 10


def test_cli_import(tmp_path, photo_folder, capsys):
    from imagegen.cli import main

    root = tmp_path / "data"
    assert main(["import", "folder", str(photo_folder), "--name", "cli-photos", "--set", "shard.target_shard_size=4",
                 "--data-root", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["samples"] == 9 and out["shards"] == 3 and out["name"] == "cli-photos"
    assert main(["datasets", "show", "cli-photos", "--data-root", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["source"] == "import"
    (tmp_path / "empty").mkdir()
    assert main(["import", "folder", str(tmp_path / "empty"), "--data-root", str(root)]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(["import", "hf", str(tmp_path / "empty"), "--data-root", str(root)]) == 2
    assert "needs image_column" in capsys.readouterr().err


@pytest.mark.slow
def test_real_img2dataset_output_is_imported_without_reencoding(tmp_path, photo_folder):
    """img2dataset itself downloads the photos from a loopback server into its webdataset layout
    (raw bytes kept); the import checks that folder and keeps every image's bytes."""
    from img2dataset import download

    files = sorted(p for p in photo_folder.rglob("*") if p.suffix in (".jpg", ".png") and p.name != "broken.png")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(photo_folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    urls = pd.DataFrame({"url": [f"{base}/{p.relative_to(photo_folder).as_posix()}" for p in files],
                         "caption": [f"picture {p.stem}" for p in files]})
    urls.to_parquet(tmp_path / "urls.parquet", index=False)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        download(url_list=str(tmp_path / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
                 output_format="webdataset", output_folder=str(tmp_path / "i2d"), disable_all_reencoding=True,
                 processes_count=1, thread_count=4, number_sample_per_shard=4, enable_wandb=False,
                 compute_hash="sha256", timeout=10)
    finally:
        httpd.shutdown()
        httpd.server_close()
    root = tmp_path / "data"
    res = import_dataset(ImportConfig(kind="webdataset", source=str(tmp_path / "i2d"), name="i2d"), root)
    ds = get_dataset(root, "i2d")
    assert res.counts["shard"]["samples"] == len(files) and res.counts["reencoded"] == 0
    by_sha = {_sha(p.read_bytes()): p for p in files}
    members = _members(ds.shards)
    man = pd.read_parquet(ds.path / "manifest.parquet")
    for _, row in man.iterrows():
        src = by_sha[row["sha256"]]  # the very bytes of a served file
        stored = members[row["key"]]
        ext = next(e for e in stored if e in ("jpg", "png"))
        assert ext == ("png" if src.suffix == ".png" else "jpg")  # img2dataset called them all .jpg
        assert stored["txt"].decode() == f"picture {src.stem}"
        assert json.loads(stored["json"])["source_meta"]["url"].endswith(src.relative_to(photo_folder).as_posix())
    # an img2dataset folder missing a shard's parquet is refused by name
    (tmp_path / "i2d" / "00000.parquet").unlink()
    with pytest.raises(ImportError_, match="have no .parquet next to them"):
        import_dataset(ImportConfig(kind="webdataset", source=str(tmp_path / "i2d")), root)


def test_hf_dataset_repo_copy_by_path(tmp_path):
    """A local copy of a hub dataset repository (data/train-*.parquet) goes through load_dataset."""
    import datasets

    path, pix, labels = _digits_dataset(tmp_path)
    repo = tmp_path / "digits-repo"
    (repo / "data").mkdir(parents=True)
    datasets.load_from_disk(str(path)).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    root = tmp_path / "data"
    res = import_dataset(ImportConfig(kind="hf", source=str(repo), split="train", image_column="image",
                                      label_column="label", caption_column="text"), root)
    ds = get_dataset(root, res.dataset_id)
    assert ds.card["source"]["how"] == "load_dataset(folder)" and res.counts["shard"]["samples"] == 60
    man = pd.read_parquet(ds.path / "manifest.parquet").sort_values("row_id")
    assert man["label"].tolist() == [str(v) for v in labels]
    # the same rows as the save_to_disk copy: the same content hash (the split name is a parameter)
    same = import_dataset(ImportConfig(kind="hf", source=str(path), image_column="image", label_column="label",
                                       caption_column="text"), root)
    assert get_dataset(root, same.dataset_id).card["content_sha256"] == ds.card["content_sha256"]
    with pytest.raises(ImportError_, match=r"Unknown split \"test\""):
        import_dataset(ImportConfig(kind="hf", source=str(repo), split="test", image_column="image"), root)
