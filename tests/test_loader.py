"""Training loader: exactly-once epochs across ranks x workers, resampling, bad samples, values."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen.loader import collate_samples, make_dataset, make_loader, resolve_rank
from imagegen.stages.shard import ShardConfig, plan_shards, write_shards, write_shards_from_plan

N_SAMPLES = 48
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def sample(i: int) -> dict:
    """Every third image is a solid-colour PNG (lossless, exact expected values); the rest are JPEGs."""
    if i % 3 == 0:
        name = list(COLORS)[(i // 3) % 3]
        arr = np.zeros((10, 14, 3), np.uint8) + np.array(COLORS[name], np.uint8)
        return {"key": f"{i:05d}", "image": encode(arr, "PNG"), "ext": "png", "caption": f"solid {name}",
                "meta": {"i": i, "color": name}}
    arr = np.random.default_rng(i).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    return {"key": f"{i:05d}", "image": encode(arr, "JPEG"), "ext": "jpg", "caption": f"noise {i}", "meta": {"i": i}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("shards")
    write_shards([sample(i) for i in range(N_SAMPLES)], out, ShardConfig(target_shard_size=6))
    paths = sorted(out.glob("*.tar"))
    assert len(paths) == 8
    return paths


ALL_KEYS = Counter(f"{i:05d}" for i in range(N_SAMPLES))


def loader_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_every_sample_read_exactly_once_across_2_ranks_x_2_workers(shards):
    per_epoch = []
    for epoch in (0, 1):
        keys: list[str] = []
        for rank in (0, 1):
            loader = make_loader(shards, batch_size=5, num_workers=2, rank=rank, world_size=2, image_size=8)
            loader.dataset.set_epoch(epoch)
            rank_keys = loader_keys(loader)
            assert rank_keys, f"rank {rank} read nothing"
            keys += rank_keys
        assert Counter(keys) == ALL_KEYS, f"epoch {epoch}: some sample missing or read twice"
        per_epoch.append(keys)
    assert per_epoch[0] != per_epoch[1], "set_epoch should change the order"


def test_exact_mode_order_is_seeded(shards):
    def keys(**kw):
        return [s["key"] for s in make_dataset(shards, image_size=4, **kw)]

    a, b = keys(seed=5), keys(seed=5)
    assert a == b and Counter(a) == ALL_KEYS
    assert keys(seed=6) != a
    plain = keys(shuffle_buffer=0)
    tar_order = []
    for path in shards:
        with tarfile.open(path) as tf:
            tar_order += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".txt")]
    assert plain == tar_order, "shuffle_buffer=0 reads shards and samples in stored order"


def test_values_channels_and_resize(shards):
    seen_colors = set()
    for s in make_dataset(shards, image_size=8, with_meta=True):
        img = s["image"]
        assert img.dtype == torch.float32 and img.shape == (3, 8, 8)
        assert img.min() >= -1.0 and img.max() <= 1.0
        assert s["meta"]["i"] == int(s["key"])
        if "color" in s["meta"]:
            expected = torch.tensor(COLORS[s["meta"]["color"]], dtype=torch.float32) / 127.5 - 1.0
            assert torch.equal(img, expected.view(3, 1, 1).expand(3, 8, 8)), s["key"]
            seen_colors.add(s["meta"]["color"])
    assert seen_colors == set(COLORS)
    # without image_size the stored size is kept (PNGs are 14x10, JPEGs 12x16)
    shapes = {tuple(s["image"].shape) for s in make_dataset(shards)}
    assert shapes == {(3, 10, 14), (3, 16, 12)}


def test_collate_and_tuple_output(shards):
    batches = list(make_dataset(shards, batch_size=7, image_size=4, shuffle_buffer=0))
    assert [b["image"].shape[0] for b in batches] == [7] * 6 + [6]
    assert all(isinstance(b["caption"], list) and isinstance(b["key"], list) for b in batches)
    first = next(iter(make_dataset(shards, image_size=4, with_meta=True, as_tuple=True)))
    assert len(first) == 4 and first[0].shape == (3, 4, 4) and isinstance(first[1], str)
    mixed = [{"image": torch.zeros(3, 2, 2), "caption": "a", "key": "a"},
             {"image": torch.zeros(3, 4, 4), "caption": "b", "key": "b"}]
    with pytest.raises(ValueError, match="image_size"):
        collate_samples(mixed)


def _tar_with_member_missing_caption(path: Path, image: bytes) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in (("nocap.jpg", image), ("nocap.json", b"{}"), ("okay1.png", sample(0)["image"]),
                           ("okay1.txt", b"fine")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_bad_samples_are_logged_and_skipped(tmp_path, caplog):
    good = {s["key"]: s for s in (sample(i) for i in range(1, 9))}
    bad_bytes = good["00001"]["image"][:40]  # a JPEG header, then nothing: PIL cannot decode it
    good["00002"] = {**good["00002"], "image": bad_bytes}
    write_shards_from_plan(plan_shards(good, ShardConfig(target_shard_size=4)), good.__getitem__, tmp_path)
    _tar_with_member_missing_caption(tmp_path / "extra.tar", sample(1)["image"])
    paths = sorted(tmp_path.glob("*.tar"))
    caplog.set_level(logging.WARNING, logger="imagegen.loader")
    keys = [s["key"] for s in make_dataset(paths, image_size=8)]
    assert Counter(keys) == Counter(set(good) - {"00002"} | {"okay1"})
    messages = [r.getMessage() for r in caplog.records if r.name == "imagegen.loader"]
    corrupt = [m for m in messages if "'00002'" in m]
    assert len(corrupt) == 1 and "cannot decode" in corrupt[0] and ".tar" in corrupt[0]
    nocap = [m for m in messages if "'nocap'" in m]
    assert len(nocap) == 1 and "no caption" in nocap[0] and "extra.tar" in nocap[0]

    # a handler returning False stops the stream at the first bad sample instead
    seen = []
    stopped = [s["key"] for s in make_dataset(paths, shuffle_buffer=0, handler=lambda e: seen.append(e) or False)]
    assert len(seen) == 1 and len(stopped) < len(keys)


@pytest.mark.timeout(120)
def test_fewer_shards_than_readers_warns_and_terminates(shards):
    few = shards[:3]
    expected = Counter()
    for path in few:
        with tarfile.open(path) as tf:
            expected.update(m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".txt"))
    keys: list[str] = []
    for rank in (0, 1):
        with pytest.warns(UserWarning, match=r"3 shards for 2 ranks x 2 workers = 4 readers: 1 will get no shard"):
            loader = make_loader(few, batch_size=4, num_workers=2, rank=rank, world_size=2, image_size=4)
        keys += loader_keys(loader)
    assert Counter(keys) == expected
    with pytest.warns(UserWarning, match="1 shards for 2 ranks"):
        ds = make_dataset(shards[:1], rank=1, world_size=2)
    assert list(ds) == []


def test_resampled_yields_epoch_samples(shards):
    ds = make_dataset(shards, resampled=True, epoch_samples=13, image_size=4, seed=3)
    a = [s["key"] for s in ds]
    assert len(a) == 13 and set(a) <= set(ALL_KEYS)
    assert a == [s["key"] for s in ds], "same seed and epoch give the same draw"
    ds.set_epoch(1)
    assert [s["key"] for s in ds] != a
    for workers, n in ((2, 11), (2, 1)):
        loader = make_loader(shards, batch_size=4, num_workers=workers, resampled=True, epoch_samples=n,
                             image_size=4, rank=1, world_size=2)
        assert len(loader_keys(loader)) == n


def test_resampled_skips_bad_shards_and_does_not_spin(tmp_path, caplog):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\0" * 10)  # not a tar
    caplog.set_level(logging.WARNING, logger="imagegen.loader")
    assert list(make_dataset([junk], resampled=True, epoch_samples=5)) == []
    assert any("junk.tar" in r.getMessage() for r in caplog.records)


def test_rank_resolution(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (2, 3)
    assert resolve_rank(0, 2) == (0, 2), "explicit args win over the environment"
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        resolve_rank(2, 2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        resolve_rank(rank=1)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="not integers"):
        resolve_rank()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"resampled": True}, ValueError, "epoch_samples"),
    ({"epoch_samples": 5}, ValueError, "only applies with resampled"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"image_size": -1}, ValueError, "image_size"),
    ({"shuffle_buffer": -2}, ValueError, "shuffle_buffer"),
])
def test_bad_arguments(shards, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_dataset(shards, **kwargs)


def test_bad_shard_lists(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        make_dataset([tmp_path / "missing.tar"])
    with pytest.raises(TypeError, match="single string"):
        make_dataset(str(shards[0]))
    with pytest.raises(ValueError, match="no shards"):
        make_dataset([])
    with pytest.raises(TypeError, match="unknown"):
        make_loader(shards, batch_size=2, colour="red")


def test_training_stream_splits_shards_across_ranks_without_duplicates(shards):
    """Resampled (training) mode: one pass over the 8 shards is split disjointly over
    2 ranks x 2 workers, so an epoch of N/2 samples per rank reads every sample exactly once."""
    for epoch in (0, 1):
        keys: list[str] = []
        per_rank = []
        for rank in range(2):
            loader = make_loader(shards, batch_size=1, num_workers=2, resampled=True, epoch_samples=N_SAMPLES // 2,
                                 image_size=4, rank=rank, world_size=2, shuffle_buffer=0, seed=5)
            loader.dataset.set_epoch(epoch)
            got = loader_keys(loader)
            per_rank.append(got)
            keys += got
        assert Counter(keys) == ALL_KEYS, f"epoch {epoch}: duplicates or gaps across ranks"
        assert not set(per_rank[0]) & set(per_rank[1])
    # the shard-to-rank split changes with the epoch
    first = {}
    for epoch in (0, 1):
        loader = make_loader(shards, batch_size=1, resampled=True, epoch_samples=N_SAMPLES // 2, image_size=4,
                             rank=0, world_size=2, shuffle_buffer=0, seed=5)
        loader.dataset.set_epoch(epoch)
        first[epoch] = set(loader_keys(loader))
    assert first[0] != first[1]


def test_training_stream_with_too_few_shards_draws_with_replacement(shards, caplog):
    caplog.set_level(logging.WARNING, logger="imagegen.loader")
    ds = make_dataset(shards[:1], resampled=True, epoch_samples=9, image_size=4, rank=1, world_size=2)
    assert len(list(ds)) == 9
    assert any("draw shards with replacement" in r.getMessage() for r in caplog.records)
