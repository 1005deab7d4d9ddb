"""Attribute (word) dropout of training captions: what it removes, that it is a function of
(seed, step, slot) alone, that it is refused where it cannot apply, and that it is in the run id."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imagegen.train.runs import run_identity
from imagegen.train.trainer import CaptionWordDropout, TrainConfig
from imagegen.world.scene import COLORS, SHAPES

NET = {"net": "unet", "net_size": "tiny", "image_size": 16,
       "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}
TEXT = {**NET, "conditioning": "text", "text_encoder": "local-dir:/nonexistent"}


def cfg(**kw) -> TrainConfig:
    return TrainConfig(family="flow", model=TEXT, steps=1, batch_size=1, **kw)


def test_strip_removes_the_words_and_fixes_articles():
    drop = CaptionWordDropout(cfg(caption_drop_words=list(COLORS), caption_word_dropout=0.5))
    assert drop.strip("a photo of an orange star") == "a photo of a star"
    assert drop.strip("A photo of a Red circle left of a blue square") == "A photo of a circle left of a square"
    assert drop.strip("a photo of three white crosses") == "a photo of three crosses"
    assert drop.strip("a photo of a circle") == "a photo of a circle"  # nothing to drop: unchanged
    assert drop.strip("a reddish blob") == "a reddish blob"  # whole words only
    vowel = CaptionWordDropout(cfg(caption_drop_words=["big"], caption_word_dropout=0.5))
    assert vowel.strip("a photo of a big orange circle") == "a photo of an orange circle"


def test_the_draw_depends_on_seed_step_and_slot_only():
    caps = [f"a photo of a red {SHAPES[i % 5]}" for i in range(400)]
    drop = CaptionWordDropout(cfg(caption_drop_words=list(COLORS), caption_word_dropout=0.3))
    a = drop(caps, step=7, slot=0)
    assert a == CaptionWordDropout(cfg(caption_drop_words=list(COLORS), caption_word_dropout=0.3))(caps, 7, 0)
    dropped = sum("red" not in c for c in a)
    assert 0.22 * len(caps) < dropped < 0.38 * len(caps)
    assert all(c == o or c == o.replace("red ", "") for c, o in zip(a, caps))
    assert a != drop(caps, step=8, slot=0) and a != drop(caps, step=7, slot=1)
    other = CaptionWordDropout(cfg(caption_drop_words=list(COLORS), caption_word_dropout=0.3, seed=1))
    assert other(caps, 7, 0) != a
    off = CaptionWordDropout(cfg())
    assert not off.active and off(caps, 7, 0) == caps


def test_refused_where_it_cannot_apply_and_part_of_the_run_id():
    with pytest.raises(ValidationError, match="needs caption_drop_words"):
        cfg(caption_word_dropout=0.2)
    with pytest.raises(ValidationError, match="are for text conditioning"):
        TrainConfig(family="flow", model={**NET, "conditioning": "class"}, steps=1, batch_size=1,
                    label_keywords=list(SHAPES), caption_drop_words=["red"], caption_word_dropout=0.2)
    with pytest.raises(ValidationError, match="distinct non-empty words"):
        cfg(caption_drop_words=["red", "RED"], caption_word_dropout=0.2)
    ids = {str(run_identity("ds", c)["config"]) for c in
           (cfg(), cfg(caption_drop_words=["red"], caption_word_dropout=0.2),
            cfg(caption_drop_words=["red"], caption_word_dropout=0.3))}
    assert len(ids) == 3
