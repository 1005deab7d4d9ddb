"""The world's own small CLIP: trained once per (world, config) on true captions, cached on disk.

The pipeline scores generated images with CLIP; real CLIPs never saw this world, so the project
trains a tiny one on world scenes and saves it in open_clip's hub layout (a ``local-dir``), so it
is loaded by the same ``imagegen.clip.load_clip`` path as any public checkpoint.

Training data come from a *derived* world: same config, seed derived from the world seed, so
the reference CLIP never saw the scenes the pipeline itself draws from ``(world seed, i)``.
Train scenes are indices ``[0, n_train)`` of that world, held-out scenes
``[n_train, n_train + n_heldout)``.

Image tower: open_clip's ModifiedResNet (the CLIP RN design, selected by a list of stage depths
in the JSON config), not a ViT (the measurements that chose it are in docs/DESIGN.md, "The
reference CLIP"). ``vision_arch="vit"`` keeps the ViT available.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from imagegen.artifacts import is_complete, read_card, stage_output
from imagegen.determinism import torch_threads
from imagegen.clip import CONFIG_NAME, SAFE_WEIGHTS_NAME
from imagegen.hashing import file_sha256, stable_hash
from imagegen.world.reference_clip_config import ReferenceClipConfig, reference_clip_id  # noqa: F401 (re-exported)
from imagegen.world.scene import Scene, WorldConfig, caption_for, render_scene

log = logging.getLogger(__name__)

# open_clip's defaults (open_clip.constants.OPENAI_DATASET_MEAN/STD); kept in the saved config so
# the val transform open_clip builds on load normalises exactly as training did.
MEAN = tuple(float(v) for v in open_clip.constants.OPENAI_DATASET_MEAN)
STD = tuple(float(v) for v in open_clip.constants.OPENAI_DATASET_STD)
VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer (BPE shipped with open_clip)
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MIRROR = {"left of": "right of", "right of": "left of", "above": "above", "below": "below"}
TRAIN_RUNS = 0  # how many times this process trained a model (tests check the cache with it)


# ------------------------------------------------------------------------------- identities


def data_world(world_cfg: WorldConfig, clip_cfg: ReferenceClipConfig) -> WorldConfig:
    """The world the reference CLIP trains on: same drawing rules, a seed derived from both."""
    seed = int(stable_hash({"purpose": "reference_clip", "world_seed": world_cfg.seed,
                            "clip_seed": clip_cfg.seed}), 16) % (2**31)
    return world_cfg.model_copy(update={"seed": seed})


def model_cfg(world_cfg: WorldConfig, clip_cfg: ReferenceClipConfig) -> dict[str, Any]:
    """open_clip model config (the ``model_cfg`` of open_clip_config.json)."""
    # The ViT cuts the image into patches; the ResNet downsamples by 32 before its attention pool.
    step = clip_cfg.patch_size if clip_cfg.vision_arch == "vit" else 32
    if world_cfg.image_size % step:
        what = f"patch_size {step}" if clip_cfg.vision_arch == "vit" else "32 (the ResNet's stride)"
        raise ValueError(f"world image_size {world_cfg.image_size} is not a multiple of {what}")
    vision: dict[str, Any] = {
        "image_size": world_cfg.image_size,
        "width": clip_cfg.vision_width,
        "head_width": clip_cfg.head_width,
    }
    if clip_cfg.vision_arch == "vit":
        vision.update(patch_size=clip_cfg.patch_size, layers=clip_cfg.vision_layers,
                      pool_type=clip_cfg.vision_pool)
    else:  # a list of stage depths makes open_clip build its ModifiedResNet
        vision.update(layers=list(clip_cfg.resnet_layers))
    return {
        "embed_dim": clip_cfg.embed_dim,
        "init_logit_scale": math.log(1 / clip_cfg.init_temperature),
        "vision_cfg": vision,
        "text_cfg": {
            "context_length": clip_cfg.context_length,
            "vocab_size": VOCAB_SIZE,
            "width": clip_cfg.text_width,
            "heads": clip_cfg.text_width // clip_cfg.head_width,
            "layers": clip_cfg.text_layers,
        },
    }


def open_clip_config(world_cfg: WorldConfig, clip_cfg: ReferenceClipConfig) -> dict[str, Any]:
    """The whole open_clip_config.json (hub layout: model_cfg + preprocess_cfg)."""
    return {
        "model_cfg": model_cfg(world_cfg, clip_cfg),
        "preprocess_cfg": {
            "size": world_cfg.image_size,
            "mode": "RGB",
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


# ------------------------------------------------------------------------------------ data


def caption_variants(scene: Scene) -> tuple[str, str, str, str]:
    """Captions of (image, image swapped order, mirrored image, mirrored swapped order).

    Mirroring is a valid augmentation because every shape is left-right symmetric; only
    "left of"/"right of" change.  Swapping the two objects of a two-object or position caption
    ("A right of B" -> "B left of A") says the same thing, so both must match the image.
    """
    objs, rel = scene.objects, scene.relation

    def cap(relation_name: str | None, swap: bool) -> str:
        if scene.kind == "position":
            assert relation_name is not None
            if swap:
                return caption_for(objs, {"relation": INVERSE[relation_name], "a": 1, "b": 0},
                                   "position")
            return caption_for(objs, {"relation": relation_name, "a": 0, "b": 1}, "position")
        if scene.kind == "two_object" and swap:
            return caption_for(list(reversed(objs)), None, "two_object")
        return caption_for(objs, None, scene.kind)

    name = rel["relation"] if rel else None
    if rel is not None and (rel.get("a"), rel.get("b")) != (0, 1):
        raise ValueError(f"scene {scene.index}: expected relation between objects 0 and 1, got {rel}")
    mirrored = MIRROR[name] if name else None
    plain = cap(name, False)
    if plain != scene.caption:
        raise ValueError(f"scene {scene.index}: rebuilt caption {plain!r} != {scene.caption!r}")
    return plain, cap(name, True), cap(mirrored, False), cap(mirrored, True)


def render_split(world: WorldConfig, start: int, stop: int) -> tuple[torch.Tensor, list[Scene]]:
    """Scenes ``[start, stop)`` of ``world`` as a uint8 (N, 3, H, W) tensor plus their Scenes."""
    size = world.image_size
    images = np.empty((stop - start, size, size, 3), dtype=np.uint8)
    scenes = []
    for k, i in enumerate(range(start, stop)):
        sc, im = render_scene(world, i)
        images[k] = np.asarray(im.convert("RGB"), dtype=np.uint8)
        scenes.append(sc)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), scenes


def to_model_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) -> normalised float, as open_clip's val transform does to a PIL image."""
    x = images_u8.float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def sample_batch(
    keys: list[tuple[str, str]], clip_cfg: ReferenceClipConfig, gen: torch.Generator
) -> tuple[list[int], list[int]]:
    """Indices and flip bits of one training batch, drawn from ``gen`` (so the order is seeded).

    ``keys[i]`` = (caption, caption of the mirrored image).  No two samples in a batch share a
    meaning (canonical caption after the flip): a duplicate would be a false negative for the
    contrastive loss, and single-object scenes have only |shapes| x |colors| captions.
    (Tried and dropped: batches drawn from a 3-colour palette to force shape negatives;
    smoke top-1 0.54 with half the batches so drawn, 0.68 without.)
    """
    order = torch.randperm(len(keys), generator=gen).tolist()
    flips = (torch.randint(0, 2, (len(keys),), generator=gen).tolist() if clip_cfg.hflip
             else [0] * len(keys))
    batch: list[int] = []
    batch_flips: list[int] = []
    seen: set[str] = set()
    for i in order:
        key = keys[i][flips[i]]
        if key in seen:
            continue
        seen.add(key)
        batch.append(i)
        batch_flips.append(flips[i])
        if len(batch) == clip_cfg.batch_size:
            break
    return batch, batch_flips


def _text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """model.encode_text on tokens cut after the longest caption (training speed only).

    With a causal mask and end-token pooling, the padding after the end token cannot change the
    pooled feature, so the cut is exact; ``_check_text_cut`` proves it on the live model.
    """
    length = int((tokens != 0).sum(dim=1).max())
    t = tokens[:, :length]
    x = model.token_embedding(t) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), t.argmax(dim=-1)]
    return x @ model.text_projection


def _check_text_cut(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        full = model.encode_text(tokens)
        cut = _text_features(model, tokens)
    if not torch.allclose(full, cut, atol=1e-4, rtol=1e-4):
        raise RuntimeError("open_clip's text tower changed: the cut text forward no longer "
                           "matches encode_text; remove the cut in reference_clip.py")


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine to zero (open_clip_train's cosine_lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def _threads(n: int) -> Iterator[int]:
    with torch_threads(n) as got:
        yield got


# ---------------------------------------------------------------------------------- metrics


@torch.no_grad()
def embed_images_tensor(model: torch.nn.Module, images_u8: torch.Tensor, batch: int = 512) -> np.ndarray:
    out = [F.normalize(model.encode_image(to_model_input(images_u8[i:i + batch])), dim=-1)
           for i in range(0, len(images_u8), batch)]
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer: Any, texts: list[str], batch: int = 1024) -> np.ndarray:
    out = [F.normalize(model.encode_text(tokenizer(texts[i:i + batch])), dim=-1)
           for i in range(0, len(texts), batch)]
    return torch.cat(out).numpy().astype(np.float32)


RETRIEVAL_METHOD = (
    "image->caption retrieval on held-out scenes. top1_distinct: the candidate captions are the "
    "set of distinct canonical captions of all held-out scenes (n_distinct_captions); an image "
    "counts as correct when the caption with the highest cosine similarity is exactly its own "
    "caption string (an equivalent wording such as the objects in swapped order counts as wrong; "
    "chance = 1/n_distinct_captions). top1_of_k: for each image, k = min(eval_candidates, "
    "n_distinct_captions) candidates = its own caption + k-1 others drawn uniformly without "
    "replacement from the other distinct held-out captions (numpy default_rng seeded by the "
    "config seed); correct when its own caption scores highest; chance = 1/k. Note: a "
    "position image is also truly described by the two-object caption of its two objects, and "
    "a two-object image whose objects happen to stand in a clear relation by that position "
    "caption, so some position<->two_object errors are not wrong answers; "
    "errors_true_kind_to_retrieved_kind counts errors by (true kind -> retrieved kind)."
)


def retrieval_metrics(
    img_emb: np.ndarray, captions: list[str], kinds: list[str], txt_of: dict[str, np.ndarray],
    candidates: int, seed: int,
) -> dict[str, Any]:
    """The two retrieval accuracies written to card.json (see RETRIEVAL_METHOD)."""
    distinct = sorted(set(captions))
    pos = {c: i for i, c in enumerate(distinct)}
    txt = np.stack([txt_of[c] for c in distinct])
    sims = img_emb @ txt.T  # (N, C)
    truth = np.array([pos[c] for c in captions])
    hit = sims.argmax(axis=1) == truth
    k = min(candidates, len(distinct))
    rng = np.random.default_rng([seed, 1])
    hit_k = np.empty(len(captions), dtype=bool)
    for i, t in enumerate(truth):
        others = rng.choice(len(distinct) - 1, size=k - 1, replace=False)
        others = others + (others >= t)  # skip the true caption
        hit_k[i] = sims[i, t] > sims[i, others].max() if k > 1 else True
    per_kind = {kd: round(float(hit[[j for j, x in enumerate(kinds) if x == kd]].mean()), 4)
                for kd in sorted(set(kinds))}
    kind_of = dict(zip(captions, kinds))
    errors: dict[str, int] = {}
    for j in np.flatnonzero(~hit):
        key = f"{kinds[j]}->{kind_of[distinct[int(sims[j].argmax())]]}"
        errors[key] = errors.get(key, 0) + 1
    return {
        "n_images": len(captions),
        "n_distinct_captions": len(distinct),
        "top1_distinct": round(float(hit.mean()), 4),
        "top1_distinct_chance": round(1 / len(distinct), 5),
        "top1_distinct_by_kind": per_kind,
        "errors_true_kind_to_retrieved_kind": dict(sorted(errors.items())),
        "k": k,
        "top1_of_k": round(float(hit_k.mean()), 4),
        "top1_of_k_chance": round(1 / k, 5),
        "method": RETRIEVAL_METHOD,
    }


# --------------------------------------------------------------------------------- training


def train_reference_clip(
    world_cfg: WorldConfig, clip_cfg: ReferenceClipConfig, out_dir: Path
) -> dict[str, Any]:
    """Train into ``out_dir`` (config + safetensors weights); return the card fields."""
    global TRAIN_RUNS
    TRAIN_RUNS += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(open_clip_config(world_cfg, clip_cfg), indent=2))
    world = data_world(world_cfg, clip_cfg)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with _threads(clip_cfg.threads) as n_threads:
        train_u8, train_scenes = render_split(world, 0, clip_cfg.n_train)
        held_u8, held_scenes = render_split(
            world, clip_cfg.n_train, clip_cfg.n_train + clip_cfg.n_heldout)
        t_render = time.perf_counter() - t0

        tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir}")
        variants = [caption_variants(s) for s in train_scenes]
        flat = [c for v in variants for c in v]
        tokens = tokenizer(flat).view(len(variants), 4, -1)
        if int((tokens[..., -1] != 0).sum()):
            raise ValueError(f"a caption is longer than context_length {clip_cfg.context_length}")

        torch.manual_seed(clip_cfg.seed)
        # Built by open_clip's own factory from the folder's config (no weights there yet, so
        # it warns that it initialises randomly: that is the point here).
        with _quiet_random_init_warning():
            model = open_clip.create_model(f"local-dir:{out_dir}", device="cpu")
        torch.nn.init.normal_(model.token_embedding.weight, std=clip_cfg.token_init_std)
        model.train()
        _check_text_cut(model, tokens[:8, 0])
        decay = [p for n, p in model.named_parameters()
                 if p.ndim >= 2 and "ln" not in n and "logit_scale" not in n]
        no_decay = [p for n, p in model.named_parameters()
                    if not (p.ndim >= 2 and "ln" not in n and "logit_scale" not in n)]
        # CLIP's AdamW settings (Radford et al. 2021): betas (0.9, 0.98), eps 1e-6.
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": clip_cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=clip_cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        loss_fn = open_clip.loss.ClipLoss()
        gen = torch.Generator().manual_seed(clip_cfg.seed)
        keys = [(v[0], v[2]) for v in variants]
        losses: list[float] = []
        seen_samples = 0
        t_train0 = time.perf_counter()
        for step in range(clip_cfg.steps):
            batch, batch_flips = sample_batch(keys, clip_cfg, gen)
            if len(batch) < 2:
                raise ValueError("fewer than 2 distinct training captions: nothing to contrast")
            idx = torch.tensor(batch)
            flip = torch.tensor(batch_flips)
            swap = (torch.randint(0, 2, (len(batch),), generator=gen) if clip_cfg.swap_order
                    else torch.zeros(len(batch), dtype=torch.long))
            x = train_u8[idx]
            if flip.any():
                x[flip.bool()] = x[flip.bool()].flip(-1)
            x = to_model_input(x)
            t = tokens[idx, 2 * flip + swap]
            for group in opt.param_groups:
                group["lr"] = clip_cfg.lr * _lr_factor(step, clip_cfg.warmup_steps, clip_cfg.steps)
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(_text_features(model, t), dim=-1)
            loss = loss_fn(img, txt, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # CLIP caps the temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            seen_samples += len(batch)
        t_train = time.perf_counter() - t_train0

        model.eval()
        t_eval0 = time.perf_counter()
        img_emb = embed_images_tensor(model, held_u8)
        captions = [s.caption for s in held_scenes]
        distinct = sorted(set(captions))
        txt_of = dict(zip(distinct, embed_texts(model, tokenizer, distinct)))
        metrics = retrieval_metrics(img_emb, captions, [s.kind for s in held_scenes], txt_of,
                                    clip_cfg.eval_candidates, clip_cfg.seed)
        t_eval = time.perf_counter() - t_eval0

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / SAFE_WEIGHTS_NAME))
    window = max(1, min(20, len(losses) // 5))
    return {
        "kind": "reference_clip",
        "world": world_cfg.model_dump(mode="json"),
        "data_world_seed": world.seed,
        "config": clip_cfg.model_dump(mode="json"),
        "model_cfg": model_cfg(world_cfg, clip_cfg),
        "splits": {"train": [0, clip_cfg.n_train],
                   "heldout": [clip_cfg.n_train, clip_cfg.n_train + clip_cfg.n_heldout]},
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps": len(losses),
        "samples_seen": seen_samples,
        "epochs": round(seen_samples / clip_cfg.n_train, 2),
        "loss_first": round(float(np.mean(losses[:window])), 4),
        "loss_last": round(float(np.mean(losses[-window:])), 4),
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "retrieval": metrics,
        "seconds": {"render": round(t_render, 2), "train": round(t_train, 2),
                    "eval": round(t_eval, 2), "total": round(time.perf_counter() - t0, 2),
                    "cpu_total": round(time.process_time() - cpu0, 2)},
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "threads": n_threads,
        "weights_sha256": file_sha256(out_dir / SAFE_WEIGHTS_NAME),
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("no CLIP weights found" in msg or "Model initialized randomly" in msg)


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    root, flt = logging.getLogger(), _DropRandomInit()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_reference_clip(
    world_cfg: WorldConfig, clip_cfg: ReferenceClipConfig | None, models_root: Path | str
) -> Path:
    """``models_root/reference_clip/<id>/``, trained only if no complete folder is there
    (``clip_cfg=None``: the default config).

    A file lock serialises processes wanting the same id: the second one waits, then finds the
    folder complete.  The folder itself appears by atomic rename (``stage_output``).
    """
    clip_cfg = clip_cfg or ReferenceClipConfig()
    root = Path(models_root) / "reference_clip"
    final = root / reference_clip_id(world_cfg, clip_cfg)
    if is_complete(final):
        return final
    with _file_lock(root / f".{final.name}.lock"):
        if is_complete(final):
            return final
        with stage_output(final) as (tmp, card):
            card.update(train_reference_clip(world_cfg, clip_cfg, tmp))
            card["id"] = final.name
        log.info("reference CLIP %s: top1_distinct %.3f in %.0f s", final.name,
                 card["retrieval"]["top1_distinct"], card["seconds"]["total"])
    return final


def world_clip_spec(
    world_cfg: WorldConfig, clip_cfg: ReferenceClipConfig | None, models_root: Path | str
) -> str:
    """Resolve the ``"world"`` CLIP alias: the local-dir spec of the (trained) reference CLIP."""
    return f"local-dir:{ensure_reference_clip(world_cfg, clip_cfg, models_root).resolve()}"


def reference_card(path: Path) -> dict[str, Any]:
    return read_card(path)
