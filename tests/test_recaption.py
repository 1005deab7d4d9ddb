"""Recaption stage: config, captioner registry, policies, the transformers path through a tiny
BLIP, CLIP retrieval through a tiny open_clip, run_recaption over parquet parts of world renders,
and caption accuracy (recaptioning beats noisy alt text)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from imagegen.stages import recaption as rc
from imagegen.stages.recaption import (
    CAPTIONERS,
    RecaptionConfig,
    build_captioner,
    choose_caption,
    mix_coin,
    register_captioner,
    run_recaption,
)
from imagegen.world.captions import caption_accuracy, parse_world_caption
from imagegen.world.detector import enumerate_world_captions
from imagegen.world.scene import WorldConfig, caption_for, render_scene

from _helpers import build_tiny_blip, tiny_random_clip

WORLD = WorldConfig(seed=21)
PART_SCHEMA = pa.schema([("key", pa.string()), ("row_id", pa.int64()), ("image", pa.binary()),
                         ("caption", pa.string())])


def _jpeg(img: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def _noisy_alt(i: int, true: str, others: list[str], rng: np.random.Generator) -> str:
    """LAION-like alt text: half right, a third another image's caption, the rest junk."""
    u = rng.random()
    if u < 0.5:
        return true
    if u < 0.83:
        pick = true
        while pick == true:
            pick = others[int(rng.integers(len(others)))]
        return pick
    return f"IMG_{1000 + i}.jpg"


def _write_parts(folder: Path, n: int, per_part: int = 24, row_group: int = 10):
    """World renders as download-stage image parts; returns keys, scenes and alt texts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scenes, imgs = zip(*(render_scene(WORLD, i) for i in range(n)))
    truths = [s.caption for s in scenes]
    keys = [f"{i:09d}" for i in range(n)]
    alts = [_noisy_alt(i, truths[i], truths, rng) for i in range(n)]
    for p, start in enumerate(range(0, n, per_part)):
        sl = slice(start, start + per_part)
        table = pa.table({"key": keys[sl], "row_id": list(range(n))[sl],
                          "image": [_jpeg(im) for im in imgs[sl]], "caption": alts[sl]}, schema=PART_SCHEMA)
        pq.write_table(table, folder / f"part-{p:05d}.parquet", row_group_size=row_group)
    return keys, list(scenes), alts


# ----------------------------------------------------------------------------- config and registry


def test_config_refuses_bad_values():
    with pytest.raises(ValidationError, match="unknown captioner backend 'nope'"):
        RecaptionConfig(backend="nope")
    with pytest.raises(ValidationError, match="needs model="):
        RecaptionConfig(backend="transformers")
    with pytest.raises(ValidationError, match="needs model="):
        RecaptionConfig(backend="clip_retrieval")
    with pytest.raises(ValidationError, match="mix_probability"):
        RecaptionConfig(policy="mix", mix_probability=1.5)
    with pytest.raises(ValidationError, match="device"):
        RecaptionConfig(device="gpu0")
    with pytest.raises(ValidationError, match="policy"):
        RecaptionConfig(policy="append")
    with pytest.raises(ValidationError, match="batch_size"):
        RecaptionConfig(batch_size=0)
    with pytest.raises(ValidationError, match="extra"):
        RecaptionConfig(polcy="mix")
    assert set(CAPTIONERS) >= {"world_detector", "clip_retrieval", "transformers"}


class _Upper:
    """A user captioner: the original alt text is unknown to it, so it captions by image size."""

    name = "size_captioner"
    model_id = "size@1"
    prompt = "how big?"

    def __init__(self, cfg: RecaptionConfig):
        self.calls: list[int] = []

    def caption(self, images):
        self.calls.append(len(images))
        return [f"an image of {im.width} by {im.height} pixels" for im in images]


def test_register_captioner(tmp_path):
    register_captioner("size_captioner", _Upper, overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        register_captioner("size_captioner", _Upper)
    with pytest.raises(TypeError, match="not callable"):
        register_captioner("broken", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be non-empty"):
        register_captioner("has space", _Upper)
    cfg = RecaptionConfig(backend="size_captioner", batch_size=7)
    keys, _, alts = _write_parts(tmp_path / "images", 20)
    cap = build_captioner(cfg)
    counts = run_recaption(tmp_path / "images", None, cfg, tmp_path / "out.parquet", captioner=cap, progress=False)
    df = pq.read_table(tmp_path / "out.parquet").to_pandas()
    assert counts["rows"] == 20 and counts["generated"] == 20
    assert (df["caption"] == "an image of 64 by 64 pixels").all()
    assert (df["captioner"] == "size_captioner").all() and (df["captioner_prompt"] == "how big?").all()
    assert (df["original_caption"] == alts).all()
    assert max(cap.calls) <= 7


def test_misbehaving_captioners_are_caught(tmp_path):
    class Short(_Upper):
        def caption(self, images):
            return ["x"]

    class NotACaptioner:
        def __init__(self, cfg):
            pass

    register_captioner("short", Short, overwrite=True)
    register_captioner("not_a_captioner", NotACaptioner, overwrite=True)
    _write_parts(tmp_path / "images", 6)
    with pytest.raises(ValueError, match="returned list of length 1 for 6 images"):
        run_recaption(tmp_path / "images", None, RecaptionConfig(backend="short"), tmp_path / "o.parquet",
                      progress=False)
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".o.parquet*")), "no partial output"
    with pytest.raises(TypeError, match="lacks name / model_id / prompt / caption"):
        build_captioner(RecaptionConfig(backend="not_a_captioner"))


# ----------------------------------------------------------------------------- policies


def test_policies():
    rep = RecaptionConfig(policy="replace")
    both = RecaptionConfig(policy="keep_both")
    assert choose_caption("k", "alt", "gen", rep) == ("gen", "generated")
    assert choose_caption("k", "alt", "gen", both) == ("gen", "generated")
    # an empty or missing generated caption never replaces the alt text
    assert choose_caption("k", "alt", "", rep) == ("alt", "original")
    assert choose_caption("k", "alt", None, both) == ("alt", "original")
    assert choose_caption("k", None, None, rep) == ("", "original")
    assert choose_caption("k", "alt", "gen", RecaptionConfig(policy="mix", mix_probability=0.0)) == ("alt", "original")
    assert choose_caption("k", "alt", "gen", RecaptionConfig(policy="mix", mix_probability=1.0)) == ("gen", "generated")


def test_mix_is_seeded_per_key():
    keys = [f"{i:09d}" for i in range(4000)]
    cfg = RecaptionConfig(policy="mix", mix_probability=0.3, seed=5)
    picks = [choose_caption(k, "a", "g", cfg)[1] == "generated" for k in keys]
    frac = sum(picks) / len(keys)
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / len(keys)) ** 0.5  # 4 sigma
    # order independent and reproducible
    again = {k: choose_caption(k, "a", "g", cfg)[1] for k in reversed(keys)}
    assert [again[k] == "generated" for k in keys] == picks
    other_seed = [choose_caption(k, "a", "g", cfg.model_copy(update={"seed": 6}))[1] == "generated" for k in keys]
    assert other_seed != picks
    assert all(0.0 <= mix_coin(1, k) < 1.0 for k in keys[:50])


# ----------------------------------------------------------------------------- caption parsing


def test_parse_round_trip_over_world_captions():
    for i in range(300):
        scene, _ = render_scene(WORLD, i)
        parsed = parse_world_caption(scene.caption)
        assert parsed is not None, scene.caption
        assert Counter(parsed["objects"]) == Counter((o["class"], o["color"]) for o in scene.objects)
        objs = [{"class": c, "color": col} for c, col in parsed["objects"]]
        rel = parsed["relation"]
        rebuilt = caption_for(objs, {"relation": rel[0], "a": rel[1], "b": rel[2]} if rel else None,
                              scene.kind if scene.kind != "two_object" or rel else None)
        assert rebuilt == scene.caption
    for cap in enumerate_world_captions()[::11]:
        assert parse_world_caption(cap) is not None, cap


@pytest.mark.parametrize("bad", ["", "IMG_1042.jpg", "a photo of two circle", "a photo of a circles",
                                 "a photo of a red dog", "a photo of a red circle left of",
                                 "a red circle", "a photo of a red circle left of two blue stars"])
def test_unparseable_captions(bad):
    assert parse_world_caption(bad) is None


def test_caption_accuracy_metrics():
    red_circle = {"class": "circle", "color": "red"}
    blue_sq = {"class": "square", "color": "blue"}
    truth = [[red_circle], [red_circle, blue_sq], [red_circle, blue_sq], [red_circle] * 3, [red_circle]]
    rels = [None, {"relation": "left of", "a": 0, "b": 1}, None, None, None]
    caps = ["a photo of a red circle",
            "a photo of a blue square right of a red circle",   # same fact, other wording
            "a photo of a blue square above a red circle",      # two_object scene: relation not judged
            "a photo of two red circles",                       # wrong count
            "IMG_1.jpg"]                                        # unparseable -> wrong
    r = caption_accuracy(caps, truth, rels, truth_captions=[caps[0], "a photo of a red circle left of a "
                                                            "blue square", "x", "y", "z"])
    assert r["n"] == 5 and r["parsed"] == 0.8
    assert r["object_match"] == pytest.approx(0.6) and r["relation_match"] == pytest.approx(0.6)
    assert r["class_match"] == pytest.approx(0.6) and r["count_match"] == pytest.approx(0.6)
    assert r["exact_match"] == pytest.approx(0.2)
    wrong_rel = caption_accuracy(["a photo of a red circle above a blue square"], [truth[1]], [rels[1]])
    assert wrong_rel["object_match"] == 1.0 and wrong_rel["relation_match"] == 0.0
    with pytest.raises(ValueError, match="2 captions but 1 truth"):
        caption_accuracy(["a", "b"], [[red_circle]])
    with pytest.raises(ValueError, match=r"truth_objects\[0\] needs dicts"):
        caption_accuracy(["a"], [[{"shape": "circle"}]])


# ----------------------------------------------------------------------------- run_recaption


def test_world_recaption_beats_noisy_alt_text(tmp_path):
    keys, scenes, alts = _write_parts(tmp_path / "images", 60)
    keep = keys[::2] + ["000000059"]  # e.g. the rows that survived filtering (59 is odd: listed)
    cfg = RecaptionConfig(backend="world_detector", batch_size=8)
    out = tmp_path / "recaption" / "captions.parquet"
    counts = run_recaption(tmp_path / "images", keep, cfg, out, progress=False)
    table = pq.read_table(out)
    df = table.to_pandas()
    assert list(df.columns) == ["key", "original_caption", "generated_caption", "caption", "caption_source",
                                "captioner", "captioner_model", "captioner_prompt"]
    assert sorted(df["key"]) == sorted(keep) and counts["rows"] == len(keep) == 31
    assert table.schema.metadata[b"recaption_policy"] == b"replace"
    by_key = dict(zip(keys, alts))
    assert all(df["original_caption"] == [by_key[k] for k in df["key"]])
    assert (df["caption_source"] == "generated").all() and (df["caption"] == df["generated_caption"]).all()
    assert (df["captioner"] == "world_detector").all()
    assert df["captioner_model"].str.startswith("imagegen.world.detector@").all()
    idx = [int(k) for k in df["key"]]
    truth = [scenes[i].objects for i in idx]
    rels = [scenes[i].relation for i in idx]
    gen = caption_accuracy(df["caption"].tolist(), truth, rels)
    alt = caption_accuracy(df["original_caption"].tolist(), truth, rels)
    assert gen["object_match"] >= 0.95 and gen["relation_match"] >= 0.95, gen
    assert alt["object_match"] <= 0.75, alt
    assert gen["object_match"] > alt["object_match"] + 0.2
    assert counts == {**counts, "generated": 31, "original": 0, "undecodable": 0, "policy": "replace"}


def test_keep_both_and_mix_policies_on_a_run(tmp_path):
    keys, _, alts = _write_parts(tmp_path / "images", 40)
    both = run_recaption(tmp_path / "images", None, RecaptionConfig(policy="keep_both"), tmp_path / "both.parquet",
                         progress=False)
    b = pq.read_table(tmp_path / "both.parquet")
    assert b.schema.metadata[b"recaption_policy"] == b"keep_both" and both["generated"] == 40
    bdf = b.to_pandas()
    assert (bdf["caption"] == bdf["generated_caption"]).all() and (bdf["original_caption"] == alts).all()
    mix_cfg = RecaptionConfig(policy="mix", mix_probability=0.5, seed=3, batch_size=5)
    run_recaption(tmp_path / "images", None, mix_cfg, tmp_path / "mix.parquet", progress=False)
    m = pq.read_table(tmp_path / "mix.parquet").to_pandas()
    expect = ["generated" if mix_coin(3, k) < 0.5 else "original" for k in keys]
    assert m["caption_source"].tolist() == expect
    assert 5 <= expect.count("generated") <= 35
    orig = m[m["caption_source"] == "original"]
    assert (orig["caption"] == orig["original_caption"]).all()
    gen = m[m["caption_source"] == "generated"]
    assert (gen["caption"] == gen["generated_caption"]).all()
    # the coin depends on the key only: a subset run makes the same choices
    sub = keys[5:17]
    run_recaption(tmp_path / "images", sub, mix_cfg.model_copy(update={"batch_size": 3}), tmp_path / "sub.parquet",
                  progress=False)
    s = pq.read_table(tmp_path / "sub.parquet").to_pandas()
    assert s["caption_source"].tolist() == expect[5:17]


def test_undecodable_rows_keep_their_alt_text(tmp_path):
    keys, _, alts = _write_parts(tmp_path / "images", 8, per_part=8)
    t = pq.read_table(tmp_path / "images" / "part-00000.parquet")
    images = t.column("image").to_pylist()
    images[3] = b"\xff\xd8\xff not a jpeg"
    t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(t, tmp_path / "images" / "part-00000.parquet")
    counts = run_recaption(tmp_path / "images", None, RecaptionConfig(), tmp_path / "o.parquet", progress=False)
    df = pq.read_table(tmp_path / "o.parquet").to_pandas().set_index("key")
    assert counts["undecodable"] == 1 and counts["original"] == 1 and counts["generated"] == 7
    row = df.loc[keys[3]]
    assert row["caption"] == alts[3] and row["caption_source"] == "original" and row["generated_caption"] is None


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image parts"):
        run_recaption(tmp_path, None, RecaptionConfig(), tmp_path / "o.parquet", progress=False)
    keys, _, _ = _write_parts(tmp_path / "images", 6)
    with pytest.raises(KeyError, match="1 requested keys are not in"):
        run_recaption(tmp_path / "images", keys[:2] + ["999999999"], RecaptionConfig(), tmp_path / "o.parquet",
                      progress=False)
    assert not (tmp_path / "o.parquet").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"key": ["a"], "image": [b""]}), bad / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"lacks columns \['caption'\]"):
        run_recaption(bad, None, RecaptionConfig(), tmp_path / "o.parquet", progress=False)
    dup = tmp_path / "dup"
    _write_parts(dup, 4, per_part=4)
    (dup / "part-00001.parquet").write_bytes((dup / "part-00000.parquet").read_bytes())
    with pytest.raises(ValueError, match="duplicate key '000000000'"):
        run_recaption(dup, None, RecaptionConfig(), tmp_path / "o.parquet", progress=False)


# ----------------------------------------------------------------------------- transformers (tiny BLIP)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip") / "blip")


def test_tiny_blip_is_saved_as_safetensors(tiny_blip):
    files = {p.name for p in tiny_blip.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert json.loads((tiny_blip / "config.json").read_text())["vision_config"]["image_size"] == 64


def test_transformers_captioner_through_the_auto_classes(tiny_blip, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = RecaptionConfig(backend="transformers", model=str(tiny_blip), prompt="a photo of", max_new_tokens=6)
    cap = build_captioner(cfg)
    assert type(cap.model).__name__ == "BlipForConditionalGeneration"
    assert type(cap.processor).__name__ == "BlipProcessor"
    assert cap.model_id.startswith(f"{tiny_blip}@") and cap.prompt == "a photo of"
    imgs = [render_scene(WORLD, i)[1] for i in range(5)]
    batch = cap.caption(imgs)
    vocab = set((tiny_blip / "vocab.txt").read_text().split())
    for text in batch:
        assert text.startswith("a photo of")  # BLIP keeps its prompt as the caption's prefix
        assert set(text.split()) <= vocab and "[DEC]" not in text and len(text.split()) <= 3 + 6
    # batching changes nothing, the random model still looks at the pixels, and reloads agree
    assert [cap.caption([im])[0] for im in imgs] == batch
    assert len(set(batch)) > 1
    assert build_captioner(cfg).caption(imgs) == batch
    no_prompt = build_captioner(cfg.model_copy(update={"prompt": None}))
    assert no_prompt.prompt is None and all(t and not t.startswith("[") for t in no_prompt.caption(imgs[:2]))


def test_run_recaption_with_tiny_blip_records_provenance(tiny_blip, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    keys, _, _ = _write_parts(tmp_path / "images", 12, per_part=5, row_group=3)
    cfg = RecaptionConfig(backend="transformers", model=str(tiny_blip), prompt="a picture of", max_new_tokens=5,
                          batch_size=4)
    counts = run_recaption(tmp_path / "images", None, cfg, tmp_path / "o.parquet", progress=False)
    df = pq.read_table(tmp_path / "o.parquet").to_pandas()
    assert df["key"].tolist() == keys and counts["rows"] == 12
    assert (df["captioner"] == "transformers").all()
    assert df["captioner_model"].nunique() == 1 and df["captioner_model"][0].startswith(str(tiny_blip) + "@")
    assert (df["captioner_prompt"] == "a picture of").all()
    assert df["generated_caption"].str.startswith("a picture of").all()
    assert counts["captioner_model"] == df["captioner_model"][0]


def test_transformers_bad_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load"):
        build_captioner(RecaptionConfig(backend="transformers", model=str(tmp_path / "empty")))


# ----------------------------------------------------------------------------- CLIP retrieval (tiny open_clip)


def _tiny_clip_dir(folder: Path) -> str:
    return tiny_random_clip(folder, context_length=32)


def test_clip_retrieval_picks_the_best_candidate(tmp_path):
    from imagegen import clip as clip_mod

    spec = _tiny_clip_dir(tmp_path / "clip")
    candidates = [s.caption for s in (render_scene(WORLD, i)[0] for i in range(30))]
    cfg = RecaptionConfig(backend="clip_retrieval", model=spec, candidates=candidates)
    cap = build_captioner(cfg)
    imgs = [render_scene(WORLD, i)[1] for i in range(6)]
    got = cap.caption(imgs)
    assert all(g in candidates for g in got)
    clip = clip_mod.load_clip(spec)
    sims = clip_mod.encode_images(clip, imgs) @ clip_mod.encode_texts(clip, candidates).T
    assert got == [candidates[int(i)] for i in sims.argmax(axis=1)]
    assert cap.model_id.startswith(spec + "@") and "30 candidates" in cap.model_id


def test_chat_template_processors_get_the_prompt_as_a_user_turn(tiny_blip, tmp_path, monkeypatch):
    """Chat VLMs (Qwen2-VL style) need the prompt rendered by their chat template; exercised here
    with the tiny BLIP given a template, since the loading and generation path is the same."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chat = tmp_path / "chat-blip"
    shutil.copytree(tiny_blip, chat)
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                "{{ c['text'] }} of{% endif %}{% endfor %}{% endfor %}")
    (chat / "chat_template.jinja").write_text(template)
    cap = build_captioner(RecaptionConfig(backend="transformers", model=str(chat), prompt="a picture",
                                          max_new_tokens=4))
    assert cap.chat
    out = cap.caption([render_scene(WORLD, 0)[1], render_scene(WORLD, 1)[1]])
    assert all(t.startswith("a picture of") for t in out), out
    default = build_captioner(RecaptionConfig(backend="transformers", model=str(chat), max_new_tokens=2))
    assert default.prompt == rc.TransformersCaptioner.DEFAULT_CHAT_PROMPT
