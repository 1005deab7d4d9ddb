"""The embedded world: scene generator (structure, captions, GenEval position rule, rendering)
and the publisher (planted faults recorded in truth, duplicate guarantees, determinism)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps
from pydantic import ValidationError

from imagegen.world.publish import (
    BAD_IMAGE_KINDS,
    FAILURE_KINDS,
    PLANTED_KINDS,
    PublishConfig,
    publish_id,
    publish_world,
    read_guarantees,
    url_table,
)
from imagegen.world.scene import (
    COLORS,
    KINDS,
    RELATIONS,
    SHAPES,
    WorldConfig,
    caption_for,
    geneval_offsets,
    geneval_relations,
    make_scene,
    render,
    render_scene,
)

N_SCENES = 300


@pytest.fixture(scope="module")
def scenes() -> list:
    cfg = WorldConfig()
    return [make_scene(cfg, i) for i in range(N_SCENES)]


# ------------------------------------------------------------------------------ config


def test_vocabulary_is_genevals():
    assert list(COLORS) == ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
    assert SHAPES == ("circle", "square", "triangle", "star", "cross")
    assert RELATIONS == ("left of", "right of", "above", "below")
    assert KINDS == ("single_object", "two_object", "counting", "position")


def test_colors_are_far_apart_and_far_from_backgrounds():
    rgb = {k: np.array(v, dtype=float) for k, v in COLORS.items()}
    for a, b in itertools.combinations(rgb, 2):
        assert np.linalg.norm(rgb[a] - rgb[b]) > 60, (a, b)
    grays = np.array([[g, g, g] for g in range(95 - 13, 166 + 13)], dtype=float)
    for name, c in rgb.items():
        assert np.linalg.norm(grays - c, axis=1).min() > 60, name


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"colors": ("red", "teal")}, "teal"),
        ({"shapes": ("circle", "hexagon")}, "hexagon"),
        ({"kind_weights": {"single_object": 1, "colour_attr": 1}}, "colour_attr"),
        ({"kind_weights": {"single_object": -1.0}}, ">= 0"),
        ({"kind_weights": {"single_object": 0.0}}, "sum to 0"),
        ({"min_object_frac": 0.4, "max_object_frac": 0.3}, "min_object_frac"),
        ({"image_size": 8}, "image_size"),
        ({"shapes": ("circle",)}, "two different shapes"),
        ({"textured_background_rate": 1.5}, "textured_background_rate"),
    ],
)
def test_world_config_refuses_bad_values(kwargs, words):
    with pytest.raises(ValidationError, match=words):
        WorldConfig(**kwargs)


def test_world_config_is_frozen_and_hashable():
    a, b = WorldConfig(seed=3), WorldConfig(seed=3)
    assert hash(a) == hash(b) and hash(a) != hash(WorldConfig(seed=4))
    with pytest.raises(ValidationError):
        a.seed = 5  # type: ignore[misc]
    # a single shape is fine when only kinds that need one shape are drawn
    WorldConfig(shapes=("circle",), kind_weights={"single_object": 1, "counting": 1})


# ------------------------------------------------------------------------------ scenes


def test_scenes_are_deterministic_per_index():
    cfg = WorldConfig(seed=7)
    forward = [make_scene(cfg, i).to_json() for i in range(20)]
    backward = [make_scene(cfg, i).to_json() for i in reversed(range(20))][::-1]
    assert forward == backward
    s1, im1 = render_scene(cfg, 11)
    s2, im2 = render_scene(WorldConfig(seed=7), 11)
    assert s1 == s2 and im1.tobytes() == im2.tobytes()
    other = [make_scene(WorldConfig(seed=8), i).to_json() for i in range(20)]
    assert forward != other
    json.dumps(forward)  # plain JSON


def test_kinds_follow_their_definitions(scenes):
    seen = set()
    for s in scenes:
        seen.add(s.kind)
        classes = [o["class"] for o in s.objects]
        colors = [o["color"] for o in s.objects]
        if s.kind == "single_object":
            assert len(s.objects) == 1 and s.relation is None
        elif s.kind == "two_object":
            assert len(s.objects) == 2 and classes[0] != classes[1] and s.relation is None
        elif s.kind == "counting":
            assert 2 <= len(s.objects) <= 4 and len(set(classes)) == 1 and len(set(colors)) == 1
        else:
            assert len(s.objects) == 2 and classes[0] != classes[1]
            assert s.relation["relation"] in RELATIONS and (s.relation["a"], s.relation["b"]) == (0, 1)
        assert set(classes) <= set(SHAPES) and set(colors) <= set(COLORS)
        assert s.caption == caption_for(s.objects, s.relation, s.kind)
        assert s.caption == caption_for(s.objects, s.relation)  # inferred kind agrees
    assert seen == set(KINDS)


def test_kind_weights_are_respected():
    cfg = WorldConfig(kind_weights={"counting": 1.0})
    assert {make_scene(cfg, i).kind for i in range(30)} == {"counting"}


@pytest.mark.parametrize("size", [64, 128])
def test_objects_inside_and_apart(size):
    cfg = WorldConfig(image_size=size)
    gap = cfg.gap
    assert gap == max(2, round(2 * size / 64))
    for i in range(200):
        s = make_scene(cfg, i)
        for o in s.objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            side = x1 - x0
            assert round(cfg.min_object_frac * size) <= side <= round(cfg.max_object_frac * size)
        for a, b in itertools.combinations([o["box"] for o in s.objects], 2):
            dx = max(b[0] - a[2], a[0] - b[2])  # free pixels between them along x (negative: overlap)
            dy = max(b[1] - a[3], a[1] - b[3])
            assert max(dx, dy) >= gap, (i, a, b)


def test_geneval_rule_by_hand():
    # B 30 px right of A, same row: dx = -(30 - 0.1*20)/30 = -0.933 -> A is left of B
    assert geneval_relations([0, 0, 10, 10], [30, 0, 40, 10]) == {"left of"}
    assert geneval_relations([30, 0, 40, 10], [0, 0, 10, 10]) == {"right of"}
    assert geneval_relations([0, 0, 10, 10], [0, 30, 10, 40]) == {"above"}
    assert geneval_relations([0, 30, 10, 40], [0, 0, 10, 10]) == {"below"}
    # exact diagonal: both components (30-2)/42.4 = 0.66 -> two relations, ambiguous
    assert geneval_relations([0, 0, 10, 10], [30, 30, 40, 40]) == {"left of", "above"}
    # overlapping centres after shrinking: no relation
    assert geneval_relations([0, 0, 10, 10], [1, 1, 11, 11]) == set()
    dx, dy = geneval_offsets([0, 0, 10, 10], [30, 0, 40, 10])
    assert dx == pytest.approx(-28 / 30) and dy == 0


def test_position_scenes_pass_geneval_with_margin(scenes):
    position = [s for s in scenes if s.kind == "position"]
    assert len(position) > 40
    for s in position:
        a = s.objects[s.relation["a"]]["box"]
        b = s.objects[s.relation["b"]]["box"]
        rel = s.relation["relation"]
        assert geneval_relations(a, b) == {rel}, (s.index, rel, a, b)
        dx, dy = geneval_offsets(a, b)
        main, other = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
        assert abs(main) >= 0.6 and abs(other) <= 0.4
        # a detector whose boxes are one pixel off still reads the same single relation
        for d in itertools.product((-1, 1), repeat=2):
            a2 = [a[0] + d[0], a[1] + d[1], a[2] + d[0], a[3] + d[1]]
            assert geneval_relations(a2, b) == {rel}
    assert {s.relation["relation"] for s in position} == set(RELATIONS)


# ----------------------------------------------------------------------------- captions


def _o(cls, color):
    return {"class": cls, "color": color, "box": [0, 0, 1, 1]}


def test_caption_phrasing():
    assert caption_for([_o("circle", "red")]) == "a photo of a red circle"
    assert caption_for([_o("star", "orange")]) == "a photo of an orange star"
    assert caption_for([_o("circle", "red"), _o("square", "blue")]) == "a photo of a red circle and a blue square"
    assert caption_for([_o("star", "green")] * 3) == "a photo of three green stars"
    assert caption_for([_o("cross", "pink")] * 2) == "a photo of two pink crosses"
    assert caption_for([_o("square", "white")] * 4, kind="counting") == "a photo of four white squares"
    rel = {"relation": "left of", "a": 0, "b": 1}
    assert caption_for([_o("circle", "red"), _o("square", "blue")], rel) == "a photo of a red circle left of a blue square"
    rel = {"relation": "below", "a": 1, "b": 0}
    assert caption_for([_o("circle", "red"), _o("square", "blue")], rel) == "a photo of a blue square below a red circle"
    # lists a detector may produce are still described
    three = [_o("circle", "red"), _o("square", "blue"), _o("circle", "red")]
    assert caption_for(three) == "a photo of two red circles and a blue square"


@pytest.mark.parametrize(
    "objects, relation, kind, words",
    [
        ([], None, None, "empty"),
        ([_o("circle", "red")] * 2, None, "single_object", "exactly 1"),
        ([_o("circle", "red"), _o("star", "red")], None, "counting", "one class"),
        ([_o("circle", "red"), _o("star", "red")], {"relation": "near", "a": 0, "b": 1}, None, "unknown relation"),
        ([_o("circle", "red"), _o("star", "red")], {"relation": "above", "a": 0, "b": 2}, None, "do not name"),
        ([{"color": "red"}], None, None, "no 'class'"),
        ([_o("circle", "red")], None, "colors", "unknown kind"),
    ],
)
def test_caption_refuses_inconsistent_input(objects, relation, kind, words):
    with pytest.raises(ValueError, match=words):
        caption_for(objects, relation, kind)


# ---------------------------------------------------------------------------- rendering


def _color_dist(img: np.ndarray, rgb) -> np.ndarray:
    return np.linalg.norm(img.astype(float) - np.array(rgb, dtype=float), axis=-1)


def test_render_background_and_object_colors(scenes):
    cfg = WorldConfig()
    for s in scenes[:80]:
        img = render(s, cfg)
        assert img.mode == "RGB" and img.size == (64, 64)
        arr = np.asarray(img).astype(int)
        free = np.ones((64, 64), bool)
        for o in s.objects:
            x0, y0, x1, y1 = o["box"]
            free[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False
            # the centre of a square/circle/cross (all solid there) has the object's colour
            if o["class"] in ("square", "circle", "cross"):
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
                assert _color_dist(arr[cy, cx], COLORS[o["color"]]) < 4
        bg = arr[free]
        assert bg.min() >= 95 - 3 - 11 and bg.max() <= 165 + 3 + 11
        assert (bg.max(axis=1) - bg.min(axis=1)).max() <= 7  # neutral: tint at most +-3
        # nothing in the background comes near any of the ten colours
        for rgb in COLORS.values():
            assert _color_dist(bg, rgb).min() > 50
    assert {s.background["type"] for s in scenes[:80]} == {"plain", "textured"}


def test_render_refuses_wrong_size():
    s = make_scene(WorldConfig(), 0)
    with pytest.raises(ValueError, match="64px"):
        render(s, WorldConfig(image_size=32))


def _coverage(shape: str) -> tuple[float, float]:
    """(fill ratio of the box, share of the object's pixels in the box's lower half)."""
    cfg = WorldConfig(image_size=128, textured_background_rate=0.0)
    s = make_scene(cfg, 0)
    s.objects = [{"class": shape, "color": "blue", "box": [32, 32, 96, 96]}]
    s.relation, s.kind = None, "single_object"
    arr = np.asarray(render(s, cfg)).astype(float)
    # coverage from the blend: 0 on the background gray, 1 on pure blue
    bgc = arr[0, 0]
    a = np.clip(np.dot(arr - bgc, np.array(COLORS["blue"]) - bgc) / np.sum((np.array(COLORS["blue"]) - bgc) ** 2), 0, 1)
    inside = a[32:96, 32:96]
    assert a.sum() == pytest.approx(inside.sum(), rel=1e-3)  # nothing drawn outside the box
    return float(inside.mean()), float(inside[32:].sum() / inside.sum())


def test_shapes_distinguishable_by_fill_ratio_and_asymmetry():
    stats = {shape: _coverage(shape) for shape in SHAPES}
    fill = {k: v[0] for k, v in stats.items()}
    assert fill["square"] > 0.97
    assert 0.74 < fill["circle"] < 0.82
    assert 0.54 < fill["cross"] < 0.64
    assert 0.46 < fill["triangle"] < 0.54
    assert 0.28 < fill["star"] < 0.38
    assert stats["triangle"][1] > 0.7  # bottom-heavy; the rest are nearly balanced
    for shape in ("square", "circle", "cross"):
        assert abs(stats[shape][1] - 0.5) < 0.02
    assert stats["star"][1] < 0.6


# ---------------------------------------------------------------------------- publishing

BOOSTED = dict(
    n_images=40,
    exact_dup_rate=0.05,
    near_dup_rate=0.1,
    **{f"{k}_rate": 0.025 for k in (*FAILURE_KINDS, *BAD_IMAGE_KINDS)},
    uninformative_rate=0.1,
    wrong_rate=0.1,
    stall_seconds=20,
)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict, pd.DataFrame]:
    out = tmp_path_factory.mktemp("world") / "pub"
    summary = publish_world(WorldConfig(seed=1), PublishConfig(**BOOSTED), out)
    return out, summary, pd.read_parquet(out / "truth.parquet")


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(data: bytes, size: int) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        up = ImageOps.exif_transpose(im).convert("RGB")
    return up.resize((size, size), Image.Resampling.BICUBIC) if up.size != (size, size) else up


def test_publish_is_byte_identical(published, tmp_path):
    out, summary, _ = published
    again = publish_world(WorldConfig(seed=1), PublishConfig(**BOOSTED), tmp_path / "again")
    assert again == summary
    first, second = _tree_hash(out), _tree_hash(tmp_path / "again")
    assert len(first) > 40 and first == second


def test_publish_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(FileExistsError, match="empty"):
        publish_world(WorldConfig(), PublishConfig(n_images=5, **{f"{k}_rate": 0 for k in (*FAILURE_KINDS, *BAD_IMAGE_KINDS)}), tmp_path)


def test_publish_config_validation():
    with pytest.raises(ValidationError, match="n_images=10"):
        PublishConfig(n_images=10, not_found_rate=0.9)
    with pytest.raises(ValidationError):
        PublishConfig(flaky_rate=-0.1)
    with pytest.raises(ValidationError):
        PublishConfig(jpeg_qualty=90)  # typo: unknown fields are refused


def test_publish_id_names_content():
    w, p = WorldConfig(), PublishConfig()
    assert publish_id(w, p) == publish_id(WorldConfig(), PublishConfig())
    assert publish_id(w, p) != publish_id(WorldConfig(seed=1), p)
    assert publish_id(w, p) != publish_id(w, PublishConfig(n_images=301))


def test_truth_schema_and_every_kind_planted(published):
    out, summary, truth = published
    spec = [
        "row_id", "path", "alt_text", "true_caption", "scene_index", "kind", "objects", "relation",
        "planted", "dup_of_row", "near_dup_transform", "phash_distance", "caption_noise",
        "expected_download", "expected_bad",
    ]
    assert list(truth.columns[: len(spec)]) == spec
    assert list(truth.row_id) == list(range(len(truth)))
    assert set(truth.planted) == set(PLANTED_KINDS)
    assert summary["planted"] == truth.planted.value_counts().to_dict()
    assert summary["rows"] == len(truth) == 40 + summary["planted"]["exact_dup"] + summary["planted"]["near_dup"]
    assert set(truth.caption_noise) == {"none", "uninformative", "wrong"}
    assert set(truth.kind) == set(KINDS)
    failures = set(truth[truth.expected_download == "failure"].planted)
    assert failures == {"not_found", "timeout", "truncated", "html"}
    assert set(truth[truth.expected_bad].planted) == {"tiny", "extreme_aspect", "blank", "corrupt", "grayscale"}
    # objects/relation are JSON that reproduce the caption
    for r in truth.itertuples():
        rel = json.loads(r.relation) if r.relation is not None else None
        assert caption_for(json.loads(r.objects), rel, r.kind) == r.true_caption
    assert read_guarantees(out)["min_distance_between_scenes"] == 11


def test_urls_match_truth(published):
    out, _, truth = published
    urls = pd.read_parquet(out / "urls.parquet")
    assert list(urls.columns) == ["path", "caption"]
    assert list(urls.path) == list(truth.path) and list(urls.caption) == list(truth.alt_text)
    table = url_table(out, "http://127.0.0.1:9/")
    assert list(table.columns) == ["url", "caption", "row_id", "record_url"]
    assert table.url[3] == "http://127.0.0.1:9" + truth.path[3] and list(table.row_id) == list(range(len(truth)))
    assert table.record_url[3] == "http://world.invalid" + truth.path[3]  # no port: same bytes on any run
    assert (url_table(out, "http://127.0.0.1:4711").record_url == table.record_url).all()
    with pytest.raises(FileNotFoundError, match="published world"):
        url_table(out / "nope", "http://x")


def test_caption_noise(published):
    _, _, truth = published
    captions = set(truth.true_caption)
    for r in truth.itertuples():
        if r.caption_noise == "none":
            assert r.alt_text == r.true_caption
        elif r.caption_noise == "wrong":
            assert r.alt_text != r.true_caption and r.alt_text in captions
        else:
            assert not r.alt_text.startswith("a photo of") and r.alt_text


def test_routes_match_planted(published):
    out, _, truth = published
    routes = json.loads((out / "routes.json").read_text())
    for r in truth.itertuples():
        route = routes[r.path]
        want = r.planted if r.planted in FAILURE_KINDS else "ok"
        assert route["behaviour"] == want
        if r.planted == "not_found":
            assert route["file"] is None
            continue
        assert (out / "files" / route["file"]).is_file()
        if r.planted == "redirect":
            assert routes[route["target"]]["behaviour"] == "ok"
        if r.planted == "html":
            assert route["content_type"].startswith("text/html")
            assert (out / "files" / route["file"]).read_bytes().startswith(b"<!doctype html>")
        else:
            assert route["content_type"] == ("image/png" if r.path.endswith(".png") else "image/jpeg")
        if r.planted == "truncated":
            assert route["content_length"] > route["send_bytes"]
        if r.planted == "timeout":
            assert route["stall_seconds"] == 20


def _file_bytes(out: Path, routes: dict, path: str) -> bytes:
    return (out / "files" / routes[path]["file"]).read_bytes()


def test_duplicates(published):
    out, _, truth = published
    routes = json.loads((out / "routes.json").read_text())
    by_id = truth.set_index("row_id")
    dups = truth[truth.planted.isin(["exact_dup", "near_dup"])]
    assert len(dups) >= 4
    for r in dups.itertuples():
        orig = by_id.loc[r.dup_of_row]
        assert orig.planted == "clean" and orig.scene_index == r.scene_index
        assert abs(r.row_id - r.dup_of_row) > 1  # shuffled apart
        a, b = _file_bytes(out, routes, r.path), _file_bytes(out, routes, orig.path)
        if r.planted == "exact_dup":
            assert a == b
        else:
            assert a != b and r.near_dup_transform
            d = imagehash.phash(_decode(a, 64)) - imagehash.phash(_decode(b, 64))
            assert d == r.phash_distance <= 4
    assert (truth[~truth.planted.isin(["exact_dup", "near_dup"])].dup_of_row == -1).all()


def test_base_scenes_are_far_apart(published):
    """Recomputed from the served files: every pair of different scenes is > 10 phash bits apart."""
    out, _, truth = published
    routes = json.loads((out / "routes.json").read_text())
    hashes, scenes = [], []
    for r in truth.itertuples():
        if r.planted in ("not_found", "html", "corrupt", "blank"):
            continue
        hashes.append(imagehash.phash(_decode(_file_bytes(out, routes, r.path), 64)))
        scenes.append(r.scene_index)
    clean = truth[truth.planted == "clean"]
    assert clean.scene_index.is_unique
    for i, j in itertools.combinations(range(len(hashes)), 2):
        if scenes[i] != scenes[j]:
            assert hashes[i] - hashes[j] > 10, (scenes[i], scenes[j])
    assert (truth[truth.nearest_other_scene_distance >= 0].nearest_other_scene_distance > 10).all()


def test_bad_images_are_what_they_claim(published):
    out, _, truth = published
    routes = json.loads((out / "routes.json").read_text())
    cfg = WorldConfig(seed=1)
    for r in truth[truth.planted.isin(BAD_IMAGE_KINDS)].itertuples():
        data = _file_bytes(out, routes, r.path)
        upright = np.asarray(render(make_scene(cfg, r.scene_index), cfg)).astype(float)
        if r.planted == "corrupt":
            assert data[:4] == b"\xff\xd8\xff\xe0"
            with pytest.raises(Exception):
                Image.open(io.BytesIO(data)).load()
            continue
        im = Image.open(io.BytesIO(data))
        im.load()
        kind = r.planted
        if kind == "tiny":
            assert im.size == (8, 8)
        elif kind == "extreme_aspect":
            assert im.size == (256, 16)
        elif kind == "blank":
            assert np.asarray(im.convert("RGB")).std(axis=(0, 1)).max() < 1.0
        elif kind == "cmyk":
            assert im.mode == "CMYK" and im.format == "JPEG"
        elif kind == "grayscale":
            assert im.mode == "L"
        elif kind == "alpha":
            assert im.mode == "RGBA" and im.format == "PNG"
        elif kind == "png16":
            assert im.format == "PNG" and data[24] == 16  # IHDR bit depth
            assert np.abs(np.asarray(im.convert("RGB")).astype(float) - upright).max() <= 1
        elif kind == "exif_rotated":
            assert im.getexif()[0x0112] in (3, 6, 8)
            stored = np.asarray(im.convert("RGB")).astype(float)
            fixed = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(float)
            assert np.abs(fixed - upright).mean() < 3 < np.abs(stored - upright).mean()
        if kind in ("cmyk", "alpha"):
            assert np.abs(np.asarray(im.convert("RGB")).astype(float) - upright).mean() < 3
