"""Filter stage on a hand-built download folder: scores, decisions and reasons per filter."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from imagegen.stages.filter import (FilterConfig, ThresholdFilter, build_filters, entropy_bits, pixel_std,
                                    register_filter, run_filter)


def _jpg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _scene(color=(40, 170, 60)) -> Image.Image:
    # an object as bright as the gray background: luminance alone cannot see it
    img = Image.new("RGB", (64, 64), (118, 118, 118))
    ImageDraw.Draw(img).ellipse((20, 20, 40, 40), fill=color)
    return img


ROWS = [  # key, image, original size, dedup representative?, expected reason
    ("a", _scene(), (64, 64), True, None),
    ("b", Image.new("RGB", (64, 64), (200, 30, 30)), (64, 64), True, "pixel_std"),
    ("c", _scene((220, 30, 30)), (8, 8), True, "min_side"),
    ("d", _scene((40, 80, 220)), (256, 16), True, "aspect_ratio"),
    ("e", _scene(), (64, 64), False, "exact_duplicate"),
    ("f", _scene((245, 245, 245)), (100, 80), True, None),
]


@pytest.fixture()
def download_dir(tmp_path):
    d = tmp_path / "dl"
    (d / "images").mkdir(parents=True)
    pd.DataFrame({"key": [r[0] for r in ROWS], "row_id": range(len(ROWS)), "status": "success",
                  "original_width": [r[2][0] for r in ROWS], "original_height": [r[2][1] for r in ROWS]}
                 ).to_parquet(d / "ledger.parquet")
    pq.write_table(pa.table({"key": [r[0] for r in ROWS], "image": [_jpg(r[1]) for r in ROWS],
                             "caption": ["a photo"] * len(ROWS)}), d / "images" / "part-00000.parquet")
    pd.DataFrame({"key": [r[0] for r in ROWS], "is_representative": [r[3] for r in ROWS],
                  "dup_kind": ["unique" if r[3] else "exact" for r in ROWS]}).to_parquet(tmp_path / "dedup.parquet")
    return d


def test_each_row_gets_its_reason(download_dir, tmp_path):
    cfg = FilterConfig(clip_score=None)
    counts = run_filter(download_dir, tmp_path / "dedup.parquet", cfg, tmp_path / "f.parquet")
    out = pd.read_parquet(tmp_path / "f.parquet").set_index("key")
    for key, *_, reason in ROWS:
        assert out.at[key, "reason"] == reason, (key, out.loc[key].to_dict())
        assert out.at[key, "keep"] == (reason is None)
    assert counts == {"images": 6, "kept": 2, "dropped": {"aspect_ratio": 1, "exact_duplicate": 1,
                                                           "min_side": 1, "pixel_std": 1}}
    # every filter scored every row, even rows an earlier filter dropped
    for name in ("aspect_ratio", "min_side", "pixel_std"):
        assert out[f"{name}_score"].notna().all() and f"{name}_pass" in out


def test_blank_score_sees_colour_not_just_luminance():
    from imagegen.stages.filter import FilterInput

    data = FilterInput(pd.DataFrame({"key": ["x", "y"]}), [_jpg(_scene()), _jpg(Image.new("RGB", (64, 64), "red"))])
    s = pixel_std(data)
    assert s[0] > 10 and s[1] < 1
    gray_std = np.asarray(_scene().convert("L"), dtype=float).std()
    assert gray_std < 2  # the luminance std this filter deliberately does not use
    e = entropy_bits(data)
    assert e[0] > e[1] == 0


def test_custom_filters_plug_in(download_dir, tmp_path):
    register_filter("no_f", lambda: ThresholdFilter("no_f", lambda d: (d.table["key"] != "f").to_numpy(float),
                                                    minimum=1.0))
    cfg = FilterConfig(clip_score=None, custom=["no_f"])
    assert [f.name for f in build_filters(cfg)][-1] == "no_f"
    run_filter(download_dir, tmp_path / "dedup.parquet", cfg, tmp_path / "f.parquet")
    out = pd.read_parquet(tmp_path / "f.parquet").set_index("key")
    assert out.at["f", "reason"] == "no_f" and out.at["a", "keep"]
    with pytest.raises(ValueError, match="custom filter"):
        FilterConfig(custom=["not-registered"])
    with pytest.raises(ValueError, match="could not be loaded"):
        build_filters(FilterConfig(clip_score=None, custom=["no.such.module:factory"]))


def test_zero_shot_presets_are_valid():
    cfg = FilterConfig(nsfw=FilterConfig.zero_shot("nsfw"), watermark=FilterConfig.zero_shot("watermark"),
                       text=FilterConfig.zero_shot("text"))
    names = [f.name for f in build_filters(cfg)]
    assert names.index("nsfw") < names.index("clip_score") and {"watermark", "text"} <= set(names)
