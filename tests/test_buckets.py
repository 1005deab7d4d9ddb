"""Aspect-ratio bucketing (issue 18): buckets, the loader's one-shape batches and exact epochs,
the world's non-square scenes, training on them and sampling at a bucket's size."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from imagegen.loader import aspect_buckets, fit_to_bucket, make_dataset, make_loader, nearest_bucket
from imagegen.stages.shard import ShardConfig, write_shards
from imagegen.world.detector import detect
from imagegen.world.scene import WorldConfig, geneval_relations, make_scene, render, render_scene

# (width, height) of the test images: tall, square-ish, wide, and between
SIZES = [(20, 40), (30, 30), (44, 22), (26, 36), (36, 26), (32, 30), (18, 48), (48, 20)]
N = 40


def _png(w: int, h: int, i: int) -> bytes:
    arr = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("bucket-shards")
    samples = []
    for i in range(N):
        w, h = SIZES[i % len(SIZES)]
        samples.append({"key": f"{i:05d}", "image": _png(w, h, i), "ext": "png", "caption": f"image {i}",
                        "meta": {"w": w, "h": h}})
    write_shards(samples, out, ShardConfig(target_shard_size=5))
    paths = sorted(out.glob("*.tar"))
    assert len(paths) == 8
    return paths


BUCKETS = aspect_buckets(32, 4, 2.0)


def test_buckets_have_about_equal_area_and_the_square():
    assert BUCKETS == ((40, 24), (36, 28), (32, 32), (28, 36), (24, 40))
    for h, w in aspect_buckets(64, 8, 2.0):
        assert h % 8 == 0 and w % 8 == 0 and max(h / w, w / h) <= 2.0
        assert 0.85 * 64 * 64 <= h * w <= 64 * 64
    assert aspect_buckets(32, 4, 1.0) == ((32, 32),)
    assert nearest_bucket(20, 40, BUCKETS) == (40, 24)  # tall -> the tallest
    assert nearest_bucket(48, 20, BUCKETS) == (24, 40)
    assert nearest_bucket(30, 30, BUCKETS) == (32, 32)
    img = Image.new("RGB", (44, 22))
    assert fit_to_bucket(img, (24, 40)).size == (40, 24)  # PIL sizes are (width, height)
    with pytest.raises(ValueError, match="multiple"):
        aspect_buckets(30, 4)
    with pytest.raises(ValueError, match="max_ratio"):
        aspect_buckets(32, 4, 0.5)


def _epoch(shards, epoch: int, seed: int = 0, batch_size: int = 3, world_size: int = 2, num_workers: int = 2):
    batches = []
    for rank in range(world_size):
        loader = make_loader(shards, batch_size=batch_size, num_workers=num_workers, buckets=BUCKETS, rank=rank,
                             world_size=world_size, seed=seed, shuffle_buffer=4, with_meta=True)
        loader.dataset.set_epoch(epoch)
        batches += list(loader)
    return batches


def test_bucketed_batches_have_one_shape_and_every_sample_once_per_epoch(shards):
    orders = []
    for epoch in (0, 1):
        batches = _epoch(shards, epoch)
        keys = Counter()
        for b in batches:
            shape = tuple(b["image"].shape[2:])
            assert shape in BUCKETS and len({tuple(x.shape) for x in b["image"]}) == 1
            for m, k in zip(b["meta"], b["key"]):
                keys[k] += 1
                assert nearest_bucket(m["w"], m["h"], BUCKETS) == shape, (k, m, shape)
            assert float(b["image"].min()) >= -1 and float(b["image"].max()) <= 1
        assert keys == Counter(f"{i:05d}" for i in range(N))  # 2 ranks x 2 workers, each sample once
        assert {tuple(b["image"].shape[2:]) for b in batches} == set(BUCKETS) - {(32, 32)} | {(32, 32)}
        orders.append([k for b in batches for k in b["key"]])
    assert orders[0] != orders[1]  # a new order per epoch...
    again = [k for b in _epoch(shards, 0) for k in b["key"]]
    assert again == orders[0]  # ...and the same batches from the same seed and epoch
    other_seed = [k for b in _epoch(shards, 0, seed=5) for k in b["key"]]
    assert other_seed != orders[0]


def test_drop_last_keeps_only_full_batches_and_training_mode_streams_buckets(shards):
    dropped = _epoch(shards, 0, batch_size=4, world_size=1, num_workers=0)
    full = make_loader(shards, batch_size=4, buckets=BUCKETS, drop_last=True, shuffle_buffer=4)
    kept = list(full)
    assert kept and all(len(b["key"]) == 4 for b in kept)
    assert sum(len(b["key"]) for b in kept) < sum(len(b["key"]) for b in dropped) == N
    stream = make_loader(shards, batch_size=3, buckets=BUCKETS, drop_last=True, resampled=True, epoch_samples=30,
                         num_workers=2, seed=3)
    got = list(stream)
    assert got and all(len(b["key"]) == 3 and tuple(b["image"].shape[2:]) in BUCKETS for b in got)
    ds = make_dataset(shards, buckets=BUCKETS, shuffle_buffer=0)
    assert {tuple(s["image"].shape[1:]) for s in ds} <= set(BUCKETS)  # unbatched samples: each its bucket
    with pytest.raises(ValueError, match="not both"):
        make_loader(shards, batch_size=2, buckets=BUCKETS, image_size=32)


# ------------------------------------------------------------------------------------- the world

WIDE_WORLD = WorldConfig(image_size=32, aspect_ratios=(0.5, 1.0, 2.0), seed=3)


def test_world_publishes_non_square_scenes_with_genevals_content():
    square = WorldConfig(image_size=32, seed=3)
    canvases = Counter()
    for i in range(120):
        scene, img = render_scene(WIDE_WORLD, i)
        w, h = scene.canvas
        canvases[(w, h)] += 1
        assert img.size == (w, h) and abs(w * h - 32 * 32) <= 32 * 2
        for o in scene.objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        if scene.relation is not None:
            a, b = scene.objects[0]["box"], scene.objects[1]["box"]
            assert geneval_relations(a, b) == {scene.relation["relation"]}
        # the object sides are the square world's (they scale with image_size, not the canvas)
        sides = [o["box"][2] - o["box"][0] for o in scene.objects]
        assert max(sides) <= round(0.38 * 32)
    assert set(canvases) == {(23, 45), (32, 32), (45, 23)}
    # a scene is a function of (seed, index): rendered twice, equal; and square worlds are unchanged
    assert make_scene(WIDE_WORLD, 7).to_json() == make_scene(WIDE_WORLD, 7).to_json()
    assert "width" not in make_scene(square, 7).to_json()
    with pytest.raises(ValidationError, match="aspect_ratios"):
        WorldConfig(aspect_ratios=(5.0,))
    with pytest.raises(ValidationError, match="narrowest canvas side"):
        WorldConfig(image_size=32, aspect_ratios=(4.0,), min_object_frac=0.4, max_object_frac=0.45)


def test_detector_reads_non_square_scenes_like_square_ones():
    wide = WorldConfig(image_size=64, aspect_ratios=(0.5, 2.0), seed=1, kind_weights={"single_object": 1.0})
    right = 0
    for i in range(12):
        scene = make_scene(wide, i)
        dets = detect(render(scene, wide))
        o = scene.objects[0]
        right += len(dets) == 1 and dets[0].class_name == o["class"] and dets[0].color == o["color"]
    assert right >= 11, right


def wide_samples(n: int) -> list[dict]:
    """The first ``n`` scenes of the non-square world as PNG shard samples (canvas size in meta)."""
    samples = []
    for i in range(n):
        scene, img = render_scene(WIDE_WORLD, i)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        samples.append({"key": f"{i:05d}", "image": buf.getvalue(), "ext": "png", "caption": scene.caption,
                        "meta": {"canvas": list(scene.canvas)}})
    return samples


def test_shard_stage_keeps_the_original_size(tmp_path):
    samples = wide_samples(6)
    write_shards(samples, tmp_path, ShardConfig(target_shard_size=6))
    (tar,) = tmp_path.glob("*.tar")
    with tarfile.open(tar) as tf:
        sizes = {m.name.split(".")[0]: Image.open(tf.extractfile(m)).size for m in tf.getmembers()
                 if m.name.endswith(".png")}
    assert sizes == {s["key"]: tuple(s["meta"]["canvas"]) for s in samples}


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("wide-world")
    samples = wide_samples(48)
    write_shards(samples, out, ShardConfig(target_shard_size=12))
    return sorted(out.glob("*.tar"))


@pytest.mark.parametrize("net", ["dit", "unet"])
def test_training_on_non_square_world_and_sampling_at_two_buckets(world_shards, tmp_path, net):
    import pandas as pd

    from imagegen.train.trainer import TrainConfig, batch_stream, train, train_buckets
    from models.checkpoint import load_family
    from models.registry import build_family

    model = {"net": net, "net_size": "tiny", "image_size": 32, "conditioning": "none"}
    if net == "unet":
        model["net_overrides"] = {"model_channels": 16, "head_channels": 16, "norm_groups": 8}
    cfg = TrainConfig(family="flow", model=model, steps=5, batch_size=4, lr=1e-3, aspect_buckets=2.0,
                      epoch_batches=4, shuffle_buffer=8, ckpt_every=5, sample_count=2, sample_steps=2)
    buckets = train_buckets(cfg, build_family("flow", cfg.model))
    assert len(buckets) >= 3 and (32, 32) in buckets
    # the batches this run reads: one bucket each, more than one bucket among them
    stream = batch_stream(cfg, world_shards, 32, 0, 0, 0, buckets)
    shapes = [tuple(next(stream)[2]["image"].shape) for _ in range(5)]
    assert all(s[0] == 4 and s[2:] in buckets for s in shapes) and len({s[2:] for s in shapes}) > 1, shapes
    train(cfg, world_shards, tmp_path / "run")
    df = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert len(df) == 5 and np.isfinite(df["loss/model"]).all() and not df["skipped"].any()
    fam = load_family(tmp_path / "run" / "checkpoints" / "step_00000005")
    for h, w in (buckets[0], buckets[-1]):  # the tallest and the widest bucket
        x = fam.sample(2, steps=2, height=h, width=w, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 3, h, w) and torch.isfinite(x).all() and float(x.abs().max()) <= 1
    with pytest.raises(ValueError, match="multiples of"):
        fam.sample(1, steps=1, height=30, width=33)


def test_bucket_training_is_refused_where_it_cannot_work():
    from imagegen.train.trainer import TrainConfig

    with pytest.raises(ValidationError, match="takes only its square"):
        TrainConfig(family="gan", model={"image_size": 32}, steps=1, batch_size=2, aspect_buckets=2.0)
    with pytest.raises(ValidationError, match=">= 1"):
        TrainConfig(family="flow", model={"net_size": "tiny", "image_size": 32}, steps=1, batch_size=2,
                    aspect_buckets=0.5)
