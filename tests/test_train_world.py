"""A smoke training run per family on the embedded world, through the generic trainer and the
shard loader: class labels from caption keywords, captions through a text tower, loss falling."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from _helpers import tiny_random_clip, world_scene_shards

from imagegen.train.trainer import Labeler, LabelError, TrainConfig, train
from imagegen.world.scene import SHAPES

NET = {"net": "unet", "net_size": "tiny", "image_size": 16,
       "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory) -> list[Path]:
    return world_scene_shards(tmp_path_factory.mktemp("world-shards"), image_format="JPEG")


pytestmark = pytest.mark.slow  # 52 s on the shared 2 cores: outside the fast tier (README, "Tests")


def run(family: str, model: dict[str, Any], shards: list[Path], run_dir: Path, **kw: Any) -> list[float]:
    cfg = TrainConfig(family=family, model={**NET, **model}, steps=40, batch_size=16, lr=2e-3, warmup_steps=5,
                      seed=1, ckpt_every=40, epoch_batches=6, shuffle_buffer=32, **kw)
    summary = train(cfg, shards, run_dir)
    assert summary["finished"] and summary["bad_steps"] == 0
    assert Path(summary["loss_curve"]).is_file() and len(summary["samples"]) == 1
    return pd.read_parquet(run_dir / "metrics.parquet")["loss/model"].tolist()


def falls(losses: list[float], factor: float = 0.85) -> None:
    first, last = statistics.mean(losses[:8]), statistics.mean(losses[-8:])
    assert last < factor * first, f"loss {first:.4f} -> {last:.4f}"


def test_ddpm_class_conditional_on_shape_keywords(world_shards, tmp_path):
    falls(run("ddpm", {"conditioning": "class", "prediction": "v", "schedule": "cosine"}, world_shards, tmp_path,
              label_keywords=list(SHAPES), sample_guidance=2.0))


def test_edm_unconditional(world_shards, tmp_path):
    falls(run("edm", {}, world_shards, tmp_path))


def test_flow_text_conditional(world_shards, tmp_path):
    spec = tiny_random_clip(tmp_path / "clip")
    falls(run("flow", {"conditioning": "text", "text_encoder": spec}, world_shards, tmp_path / "run",
              sample_prompts=["a photo of a red circle", "a photo of two blue squares"], sample_guidance=3.0,
              caption_drop_words=["red", "blue", "green"], caption_word_dropout=0.3))  # through the training loop


def test_labels_from_caption_keywords_and_fields():
    cfg = TrainConfig(family="ddpm", model={**NET, "conditioning": "class"}, steps=1, batch_size=1,
                      label_keywords=list(SHAPES))
    lab = Labeler(cfg)
    assert cfg.model["num_classes"] == len(SHAPES)
    assert lab.label("a photo of four purple crosses", None, "k") == SHAPES.index("cross")
    assert lab.label("a photo of a Red STAR left of a blue circle", None, "k") == SHAPES.index("star")
    assert lab.label("two circles above a square", None, "k") == SHAPES.index("circle")
    with pytest.raises(LabelError, match="sample 'k7'.*none of the label_keywords"):
        lab.label("a photo of a starfish", None, "k7")
    by_field = Labeler(TrainConfig(family="ddpm", model={**NET, "conditioning": "class"}, steps=1, batch_size=1,
                                   label_field="meta.cls", classes=["cat", "dog"]))
    batch = {"caption": ["x", "y"], "key": ["a", "b"], "meta": [{"meta": {"cls": "dog"}}, {"meta": {"cls": "cat"}}]}
    assert by_field(batch).tolist() == [1, 0]
    with pytest.raises(LabelError, match="sample 'b'.*class 'cow'"):
        by_field({**batch, "meta": [{"meta": {"cls": "dog"}}, {"meta": {"cls": "cow"}}]})
    with pytest.raises(LabelError, match="sample 'a'.*no field 'meta.cls'"):
        by_field({**batch, "meta": [{}, {}]})
