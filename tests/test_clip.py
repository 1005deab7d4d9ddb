"""CLIP specs, the open_clip loading path, and the world's reference CLIP (tiny config)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from imagegen import clip as C
from imagegen.hashing import file_sha256
from imagegen.world import reference_clip as R
from imagegen.world.scene import WorldConfig, make_scene, render_scene

# A small world (single objects and counts of 3 shapes x 6 colours: 72 captions) and a CLIP
# small enough to train in a few seconds on 2 cores.  One thread: bit-for-bit repeatable here.
TINY_WORLD = WorldConfig(
    seed=3,
    shapes=("circle", "square", "triangle"),
    colors=("red", "blue", "green", "yellow", "purple", "white"),
    kind_weights={"single_object": 1.0, "counting": 1.0},
)
TINY_CLIP = R.ReferenceClipConfig(
    n_train=400, n_heldout=100, steps=100, batch_size=32, lr=3e-3, warmup_steps=10,
    embed_dim=32, vision_arch="resnet", vision_width=8, text_width=32, text_layers=1,
    head_width=32, eval_candidates=20, threads=1,
)


# ------------------------------------------------------------------------------ spec parsing


@pytest.mark.parametrize(
    ("spec", "kind", "args"),
    [
        ("ViT-B-32:laion2b_s34b_b79k", "pretrained", ("ViT-B-32", "laion2b_s34b_b79k")),
        ("  ViT-B-32:OpenAI ", "pretrained", ("ViT-B-32", "openai")),
        ("ViT-B-32:/w/b32.safetensors", "checkpoint", ("ViT-B-32", "/w/b32.safetensors")),
        ("ViT-B-32:model.bin", "checkpoint", ("ViT-B-32", str(Path("model.bin").resolve()))),
        ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf-hub",
         ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)),
        ("local-dir:/models/world", "local-dir", ("local-dir:/models/world", None)),
    ],
)
def test_parse_good_specs(spec: str, kind: str, args: tuple) -> None:
    parsed = C.parse_spec(spec)
    assert parsed.kind == kind
    assert parsed.open_clip_args() == args
    assert C.parse_spec(str(parsed)) == parsed  # the canonical string round-trips


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("ViT-B-32", "names no weights"),
        ("ViTB32:openai", "did you mean ViT-B-32"),
        ("ViT-B-32:no_such_tag", "no pretrained tag 'no_such_tag'"),
        ("ViT-B-32:", "required"),
        ("hf-hub:just-a-name", "expected 'org/repo'"),
        ("hf-hub:", "expected 'org/repo'"),
        ("local-dir:", "empty folder"),
        ("hf:org/repo", "unknown open_clip architecture 'hf'"),
        ("ViT-B-32:two words", "neither a pretrained tag nor a path"),
        ("world", "alias the caller must resolve"),
    ],
)
def test_parse_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(C.ClipSpecError, match=message):
        C.parse_spec(spec)


def test_world_alias_resolves_through_aliases() -> None:
    parsed = C.parse_spec("world", aliases={"world": "local-dir:/m/ref"})
    assert parsed.kind == "local-dir" and str(parsed) == "local-dir:/m/ref"


# ---------------------------------------------------------------- refusing / missing weights


def test_pickle_checkpoints_are_refused_without_reading(tmp_path: Path) -> None:
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"not even a pickle")  # refused by kind, so never opened
    with pytest.raises(C.UnsafeCheckpointError, match="allow_pickle=True"):
        C.load_clip(f"ViT-B-32:{bad}")
    pt = tmp_path / "dir"
    pt.mkdir()
    (pt / C.CONFIG_NAME).write_text(json.dumps({"model_cfg": {}}))
    (pt / "open_clip_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(C.UnsafeCheckpointError, match="pickle"):
        C.load_clip(f"local-dir:{pt}")


def test_missing_weights_errors_name_the_spec_and_the_fix(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(C.ClipWeightsMissingError, match=r"ViT-B-32:.*does not exist"):
        C.load_clip(f"ViT-B-32:{tmp_path / 'nope.safetensors'}")
    with pytest.raises(C.ClipWeightsMissingError, match="does not exist"):
        C.load_clip(f"local-dir:{tmp_path / 'absent'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(C.ClipWeightsMissingError, match="no open_clip_config.json"):
        C.load_clip(f"local-dir:{empty}")
    (empty / C.CONFIG_NAME).write_text("{}")
    with pytest.raises(C.ClipWeightsMissingError, match="no weights file"):
        C.load_clip(f"local-dir:{empty}")
    # Offline with an empty hub cache: a clear error, no network, no random weights.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    for spec in ("ViT-B-32:laion2b_s34b_b79k", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        with pytest.raises(C.ClipWeightsMissingError) as err:
            C.load_clip(spec, cache_dir=cache)
        text = str(err.value)
        assert spec in text and "HF_HUB_OFFLINE" in text and "Pre-place the weights" in text


# ------------------------------------------------------------- the reference CLIP (trained)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_dir(models_root: Path) -> Path:
    before = R.TRAIN_RUNS
    path = R.ensure_reference_clip(TINY_WORLD, TINY_CLIP, models_root)
    assert R.TRAIN_RUNS == before + 1
    return path


def test_reference_clip_folder_is_an_open_clip_local_dir(tiny_dir: Path) -> None:
    assert tiny_dir.parent.name == "reference_clip"
    assert tiny_dir.name == R.reference_clip_id(TINY_WORLD, TINY_CLIP)
    cfg = json.loads((tiny_dir / C.CONFIG_NAME).read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == TINY_WORLD.image_size
    assert cfg["model_cfg"]["text_cfg"]["context_length"] == 32
    card = R.reference_card(tiny_dir)
    assert card["weights_sha256"] == file_sha256(tiny_dir / C.SAFE_WEIGHTS_NAME)
    assert card["steps"] == TINY_CLIP.steps
    assert card["loss_last"] < card["loss_first"]
    assert not list(tiny_dir.parent.glob("*.tmp-*"))


def test_reference_clip_retrieval_beats_chance(tiny_dir: Path) -> None:
    r = R.reference_card(tiny_dir)["retrieval"]
    assert r["n_images"] == TINY_CLIP.n_heldout
    assert r["n_distinct_captions"] >= 20
    # Measured here: 0.39 of 46 captions (18x chance) and 0.67 of 20 (13x chance).
    assert r["top1_distinct"] >= 5 * r["top1_distinct_chance"], r
    assert r["top1_of_k"] >= 4 * r["top1_of_k_chance"], r


def test_ensure_is_cached(tiny_dir: Path, models_root: Path) -> None:
    runs, mtime = R.TRAIN_RUNS, (tiny_dir / C.SAFE_WEIGHTS_NAME).stat().st_mtime_ns
    again = R.ensure_reference_clip(TINY_WORLD, TINY_CLIP, models_root)
    assert again == tiny_dir
    assert R.TRAIN_RUNS == runs
    assert (tiny_dir / C.SAFE_WEIGHTS_NAME).stat().st_mtime_ns == mtime
    # every field is part of the identity, the thread count too (it changes the weights' bits)
    assert R.reference_clip_id(TINY_WORLD, TINY_CLIP.model_copy(update={"threads": 2})) != tiny_dir.name
    assert R.reference_clip_id(TINY_WORLD, TINY_CLIP.model_copy(update={"steps": 61})) != tiny_dir.name
    assert R.reference_clip_id(TINY_WORLD.model_copy(update={"seed": 4}), TINY_CLIP) != tiny_dir.name
    assert R.world_clip_spec(TINY_WORLD, TINY_CLIP, models_root) == f"local-dir:{tiny_dir.resolve()}"


def test_reload_through_open_clip_matches_in_memory_model(tiny_dir: Path) -> None:
    clip = C.load_clip(f"local-dir:{tiny_dir}")
    assert C.load_clip(f"local-dir:{tiny_dir}") is clip  # cached per (spec, device)
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())
    assert clip.identity["weights_sha256"] == file_sha256(tiny_dir / C.SAFE_WEIGHTS_NAME)
    assert clip.identity["open_clip_version"] == open_clip.__version__
    # The in-memory twin: same config, weights put back with plain load_state_dict.
    cfg = json.loads((tiny_dir / C.CONFIG_NAME).read_text())["model_cfg"]
    twin = open_clip.CLIP(**cfg).eval()
    twin.load_state_dict(load_file(str(tiny_dir / C.SAFE_WEIGHTS_NAME)))
    world = R.data_world(TINY_WORLD, TINY_CLIP)
    u8, scenes = R.render_split(world, TINY_CLIP.n_train, TINY_CLIP.n_train + 10)
    images = [render_scene(world, s.index)[1] for s in scenes]
    via_pil = C.encode_images(clip, images, batch_size=4)  # open_clip's val transform
    via_tensor = R.embed_images_tensor(twin, u8)  # the training path
    np.testing.assert_allclose(via_pil, via_tensor, atol=1e-5)
    captions = [s.caption for s in scenes]
    np.testing.assert_allclose(
        C.encode_texts(clip, captions), R.embed_texts(twin, clip.tokenizer, captions), atol=1e-5)
    # The same weights through the NAME:/file.safetensors route give the same embeddings.
    arch = tiny_dir.parent / "imagegen-test-tiny.json"
    arch.write_text(json.dumps(cfg))
    open_clip.add_model_config(arch)
    other = C.load_clip(f"imagegen-test-tiny:{tiny_dir / C.SAFE_WEIGHTS_NAME}")
    np.testing.assert_allclose(C.encode_images(other, images), via_pil, atol=1e-5)


def test_cache_follows_the_weights_file_not_the_spec_string(tiny_dir: Path, tmp_path: Path) -> None:
    """A long-lived process whose local-dir is rewritten gets the new weights and identity."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "rewritten"
    shutil.copytree(tiny_dir, folder)
    spec = f"local-dir:{folder}"
    first = C.load_clip(spec)
    assert C.load_clip(spec) is first
    state = load_file(str(folder / C.SAFE_WEIGHTS_NAME))
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()},
              str(folder / C.SAFE_WEIGHTS_NAME))
    second = C.load_clip(spec)
    assert second is not first
    assert second.identity["weights_sha256"] == file_sha256(folder / C.SAFE_WEIGHTS_NAME)
    assert second.identity["weights_sha256"] != first.identity["weights_sha256"]
    texts = ["a photo of a red circle"]
    assert not np.allclose(C.encode_texts(second, texts), C.encode_texts(first, texts))


def test_allow_pickle_loads_a_bin_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / C.CONFIG_NAME).write_text((tiny_dir / C.CONFIG_NAME).read_text())
    torch.save(load_file(str(tiny_dir / C.SAFE_WEIGHTS_NAME)), folder / "open_clip_pytorch_model.bin")
    with pytest.raises(C.UnsafeCheckpointError):
        C.load_clip(f"local-dir:{folder}")
    clip = C.load_clip(f"local-dir:{folder}", allow_pickle=True)
    ref = C.load_clip(f"local-dir:{tiny_dir}")
    texts = ["a photo of a red circle", "a photo of three blue squares"]
    np.testing.assert_allclose(C.encode_texts(clip, texts), C.encode_texts(ref, texts), atol=1e-6)


def test_encode_cosine_and_zero_shot(tiny_dir: Path) -> None:
    clip = C.load_clip(f"local-dir:{tiny_dir}")
    world = R.data_world(TINY_WORLD, TINY_CLIP)
    pairs = [render_scene(world, i) for i in range(TINY_CLIP.n_train, TINY_CLIP.n_train + 60)]
    images = [im for _, im in pairs]
    img = C.encode_images(clip, images, batch_size=7)
    txt = C.encode_texts(clip, [s.caption for s, _ in pairs])
    assert img.shape == (60, clip.embed_dim) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(C.encode_images(clip, images[:5]), img[:5], atol=1e-5)  # batching
    cos = C.cosine(img, txt)
    np.testing.assert_allclose(cos, np.diag(img @ txt.T), atol=1e-5)
    # True captions score above a mismatched pairing on average.
    assert cos.mean() > C.cosine(img, np.roll(txt, 1, axis=0)).mean()
    with pytest.raises(ValueError, match="equal shape"):
        C.cosine(img, txt[:3])
    assert C.encode_images(clip, []).shape == (0, clip.embed_dim)
    with pytest.raises(TypeError, match="item 1"):
        C.encode_images(clip, [images[0], "not an image"])  # type: ignore[list-item]

    colors = TINY_WORLD.colors
    prompts = {c: [f"a photo of a {c} {s}" for s in TINY_WORLD.shapes] for c in colors}
    labels, probs = C.zero_shot(clip, images, prompts)
    truth = [s.objects[0]["color"] for s, _ in pairs]
    assert probs.shape == (60, len(colors))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert labels == [colors[i] for i in probs.argmax(axis=1)]
    accuracy = np.mean([a == b for a, b in zip(labels, truth)])
    assert accuracy >= 2 / len(colors), accuracy  # chance is 1/6
    with pytest.raises(ValueError, match="class 'red'"):
        C.zero_shot(clip, images, {"red": []})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of head_width"):
        R.ReferenceClipConfig(vision_arch="vit", vision_width=100, head_width=64)
    with pytest.raises(ValueError, match="multiple of head_width"):
        R.ReferenceClipConfig(text_width=100, head_width=64)
    with pytest.raises(ValueError, match="warmup_steps"):
        R.ReferenceClipConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="patch_size"):
        R.model_cfg(WorldConfig(image_size=60), R.ReferenceClipConfig(vision_arch="vit", vision_width=128))
    with pytest.raises(ValueError, match="ResNet's stride"):
        R.model_cfg(WorldConfig(image_size=80), R.ReferenceClipConfig())
    # Both image towers are plain open_clip configs.
    for cfg in (R.ReferenceClipConfig(), R.ReferenceClipConfig(vision_arch="vit", vision_width=64)):
        model = open_clip.CLIP(**R.model_cfg(WorldConfig(), cfg))
        assert model.encode_image(torch.zeros(2, 3, 64, 64)).shape == (2, cfg.embed_dim)


def test_caption_variants_mirror_and_swap() -> None:
    world = WorldConfig(seed=1, kind_weights={"position": 1.0})
    for i in range(20):
        scene, _ = render_scene(world, i)
        plain, swapped, mirrored, mirrored_swapped = R.caption_variants(scene)
        rel = scene.relation["relation"]
        assert plain == scene.caption
        assert R.INVERSE[rel] in swapped
        assert (R.MIRROR[rel] in mirrored) and (rel in ("above", "below") or mirrored != plain)
        a, b = scene.objects
        assert swapped.startswith(f"a photo of a {b['color']} {b['class']}") or \
            swapped.startswith(f"a photo of an {b['color']} {b['class']}")
        assert mirrored_swapped != mirrored


_CHILD = """
import json, sys
from pathlib import Path
from imagegen.world import reference_clip as R
from imagegen.world.scene import WorldConfig
world = WorldConfig.model_validate_json(sys.argv[1])
cfg = R.ReferenceClipConfig.model_validate_json(sys.argv[2])
path = R.ensure_reference_clip(world, cfg, Path(sys.argv[3]))
print(json.dumps({"path": str(path), "trained": R.TRAIN_RUNS}))
"""


@pytest.mark.slow
def test_two_processes_share_one_training(tmp_path: Path) -> None:
    cfg = TINY_CLIP.model_copy(update={"steps": 8, "warmup_steps": 2, "n_train": 64, "n_heldout": 20})
    cmd = [sys.executable, "-c", _CHILD, TINY_WORLD.model_dump_json(), cfg.model_dump_json(),
           str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["path"] == outs[1]["path"]
    assert sorted(o["trained"] for o in outs) == [0, 1]  # one trained, the other waited
    folder = Path(outs[0]["path"])
    assert (folder / "card.json").is_file()
    assert [p.name for p in (tmp_path / "reference_clip").iterdir() if not p.name.startswith(".")] \
        == [folder.name]


def test_sample_batch_is_seeded_and_has_no_repeated_meaning() -> None:
    world = WorldConfig(seed=5)
    scenes = [make_scene(world, i) for i in range(300)]
    keys = [(v[0], v[2]) for v in map(R.caption_variants, scenes)]
    cfg = R.ReferenceClipConfig(batch_size=64)
    a = R.sample_batch(keys, cfg, torch.Generator().manual_seed(1))
    assert a == R.sample_batch(keys, cfg, torch.Generator().manual_seed(1))  # seeded order
    assert a != R.sample_batch(keys, cfg, torch.Generator().manual_seed(2))
    batch, flips = a
    assert len(batch) == 64 and set(flips) == {0, 1}
    meanings = [keys[i][f] for i, f in zip(batch, flips)]
    assert len(set(meanings)) == len(meanings)  # no false negatives in the batch
    # Only 3 distinct single-object captions: the batch stops at 3 rather than repeat one.
    few = [("a photo of a red circle",) * 2, ("a photo of a blue star",) * 2,
           ("a photo of a red star",) * 2] * 10
    small, _ = R.sample_batch(few, cfg, torch.Generator().manual_seed(0))
    assert len(small) == 3 and len({few[i][0] for i in small}) == 3
