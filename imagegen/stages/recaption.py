"""Recaption stage: replace (or complement) noisy alt text with captions generated from the pixels.

Captioners are pluggable: a small registry maps a backend name to a factory that takes the
:class:`RecaptionConfig` and returns an object with ``name``, ``model_id``, ``prompt`` and
``caption(images) -> list[str]``.  Three ship here:

* ``world_detector`` - the synthetic world's pixel-only detector (exact for world scenes);
* ``clip_retrieval`` - pick the best of a candidate caption list by CLIP similarity;
* ``transformers``   - any Hugging Face image-to-text model (BLIP, GIT, Florence-2, Qwen2-VL ...)
  loaded through ``AutoProcessor`` + ``AutoModelForImageTextToText``, from the Hub or a local folder.

The original alt text is never thrown away: the output always has ``original_caption`` next to
``generated_caption``, and ``caption`` is the final one chosen by the policy.  Every row records
which captioner, model and prompt produced it, so a mixed dataset stays auditable.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from imagegen.hashing import code_version, file_sha256, stable_hash

log = logging.getLogger(__name__)

Policy = Literal["replace", "keep_both", "mix"]

OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("original_caption", pa.string()),
    ("generated_caption", pa.string()),
    ("caption", pa.string()),
    ("caption_source", pa.string()),
    ("captioner", pa.string()),
    ("captioner_model", pa.string()),
    ("captioner_prompt", pa.string()),
])


class RecaptionConfig(BaseModel):
    """What captions the images and how the final caption is chosen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field("world_detector", description="captioner name in CAPTIONERS: world_detector | "
                         "clip_retrieval | transformers | any name added with register_captioner")
    model: str | None = Field(None, description="transformers: HF repo id or local folder; clip_retrieval: "
                              "the CLIP spec for imagegen.clip.load_clip")
    prompt: str | None = Field(None, max_length=2000, description="text prompt for VLMs that take one "
                               "(BLIP: caption prefix; chat VLMs: the user instruction)")
    max_new_tokens: int = Field(40, ge=1, le=1024, description="generation length limit")
    batch_size: int = Field(16, ge=1, le=4096, description="images per captioner call")
    policy: Policy = Field("replace", description="replace: final = generated; keep_both: final = generated "
                           "and the shard stage also stores the original; mix: per-key seeded coin")
    mix_probability: float = Field(0.5, ge=0.0, le=1.0, description="mix: probability of the generated caption")
    seed: int = Field(0, ge=0, description="seed of the mix coin (per key, order independent)")
    device: str = Field("cpu", description="cpu | cuda | cuda:N | mps | auto")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "float32", description="weights dtype for the transformers backend")
    candidates: list[str] | None = Field(None, description="clip_retrieval: candidate captions "
                                         "(default: every caption the synthetic world can produce)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r} is not one of cpu, auto, mps, cuda, cuda:N")
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in CAPTIONERS:
            raise ValueError(f"unknown captioner backend {v!r}; registered: {sorted(CAPTIONERS)} "
                             f"(add one with register_captioner)")
        return v

    @model_validator(mode="after")
    def _needs_model(self) -> "RecaptionConfig":
        if self.backend == "transformers" and not self.model:
            raise ValueError("backend 'transformers' needs model= (a HF repo id or a local folder)")
        if self.backend == "clip_retrieval" and not self.model:
            raise ValueError("backend 'clip_retrieval' needs model= (a CLIP spec for imagegen.clip.load_clip)")
        if self.candidates is not None and not [c for c in self.candidates if c.strip()]:
            raise ValueError("candidates is an empty list; give captions or leave it None")
        return self


# --------------------------------------------------------------------------- captioner registry


@runtime_checkable
class Captioner(Protocol):
    """Anything that turns a batch of images into one caption each."""

    name: str
    model_id: str
    prompt: str | None

    def caption(self, images: list[Image.Image]) -> list[str]: ...


CaptionerFactory = Callable[[RecaptionConfig], Captioner]
CAPTIONERS: dict[str, CaptionerFactory] = {}


def register_captioner(name: str, factory: CaptionerFactory, *, overwrite: bool = False) -> None:
    """Add a captioner backend; ``factory(cfg)`` must return a :class:`Captioner`."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name or ""):
        raise ValueError(f"captioner name {name!r} must be non-empty letters, digits, _ . -")
    if name in CAPTIONERS and not overwrite:
        raise ValueError(f"captioner {name!r} is already registered (pass overwrite=True to replace it)")
    if not callable(factory):
        raise TypeError(f"captioner factory for {name!r} is not callable: {factory!r}")
    CAPTIONERS[name] = factory


def build_captioner(cfg: RecaptionConfig) -> Captioner:
    cap = CAPTIONERS[cfg.backend](cfg)
    if not isinstance(cap, Captioner):
        raise TypeError(f"captioner factory {cfg.backend!r} returned {type(cap).__name__}, which lacks "
                        "name / model_id / prompt / caption()")
    return cap


def _checked_captions(cap: Captioner, images: list[Image.Image]) -> list[str]:
    """Call a (possibly user-written) captioner and refuse answers of the wrong shape."""
    out = cap.caption(images)
    if not isinstance(out, list) or len(out) != len(images):
        raise ValueError(f"captioner {cap.name!r} returned {type(out).__name__} of length "
                         f"{len(out) if hasattr(out, '__len__') else '?'} for {len(images)} images")
    bad = [i for i, c in enumerate(out) if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captioner {cap.name!r} returned non-strings at positions {bad[:5]}")
    return [" ".join(c.split()) for c in out]  # one line, single spaces: captions go into .txt files


# --------------------------------------------------------------------------- world detector


class WorldDetectorCaptioner:
    """Captions synthetic-world images from their pixels (never the scene ground truth)."""

    name = "world_detector"
    prompt: str | None = None

    def __init__(self, cfg: RecaptionConfig | None = None):
        from imagegen.world import detector

        self._detector = detector
        self.model_id = f"imagegen.world.detector@{code_version(detector)}"  # changes with its code

    def caption(self, images: list[Image.Image]) -> list[str]:
        d = self._detector
        return [d.caption_from_detections(d.detect(img)) for img in images]


# --------------------------------------------------------------------------- CLIP retrieval


def world_candidate_captions() -> list[str]:
    """Every caption the world's detector can produce, for CLIP retrieval over the world."""
    from imagegen.world.detector import enumerate_world_captions

    return enumerate_world_captions()


class ClipRetrievalCaptioner:
    """Pick the candidate caption with the highest CLIP image-text cosine similarity.

    ``cfg.model`` is a CLIP spec for :func:`imagegen.clip.load_clip` (e.g. ``local-dir:/models/x``
    or ``ViT-B-32:laion2b_s34b_b79k``); candidate texts are embedded once and kept.
    """

    name = "clip_retrieval"
    prompt: str | None = None

    def __init__(self, cfg: RecaptionConfig, clip: Any | None = None):
        from imagegen import clip as clip_mod

        if clip is None:
            if not cfg.model:
                raise ValueError("backend 'clip_retrieval' needs model= (a CLIP spec for imagegen.clip.load_clip)")
            clip = clip_mod.load_clip(cfg.model, device=_resolve_device(cfg.device))
        self._clip_mod = clip_mod
        self.clip = clip
        self.candidates = [c for c in (cfg.candidates or world_candidate_captions()) if c.strip()]
        ident = getattr(clip, "identity", {}) or {}
        weights = str(ident.get("weights_sha256", ""))[:12]
        self.model_id = (f"{ident.get('spec', cfg.model)}@{weights or 'unknown'}"
                         f"|{len(self.candidates)} candidates {stable_hash(self.candidates, 8)}")
        self._text: np.ndarray | None = None

    def text_features(self) -> np.ndarray:
        if self._text is None:
            self._text = self._clip_mod.encode_texts(self.clip, self.candidates)
        return self._text

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        img = self._clip_mod.encode_images(self.clip, images)  # L2-normalised rows
        best = (img @ self.text_features().T).argmax(axis=1)
        return [self.candidates[int(i)] for i in best]


# --------------------------------------------------------------------------- transformers VLMs


def _model_revision(model: str, loaded: Any) -> str:
    """A revision for provenance: the Hub commit when known, else a digest of the local weights."""
    commit = getattr(getattr(loaded, "config", None), "_commit_hash", None)
    if commit:
        return str(commit)[:12]
    folder = Path(model)
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + \
            sorted(folder.glob("config.json"))
        return stable_hash([(f.name, file_sha256(f)) for f in files], 12)
    return "unknown"


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but torch sees no CUDA device")
    return device


class TransformersCaptioner:
    """A Hugging Face image-to-text model: processor + ``generate`` + batch decode.

    Loading goes through the Auto classes only, so a Hub id and a local folder (also with
    ``HF_HUB_OFFLINE=1``) take the same path.  Processors that carry a chat template (Qwen2-VL,
    SmolVLM, ...) get the prompt wrapped as a user turn with one image; the others (BLIP, GIT,
    Florence-2) get the prompt as plain text, which BLIP treats as the caption's prefix and
    keeps in its output.  Decoder-only models echo their input, so an output that starts with
    the exact input ids has them cut off.  Decoding is greedy, hence deterministic.
    """

    name = "transformers"
    DEFAULT_CHAT_PROMPT = "Describe this image in one sentence."

    def __init__(self, cfg: RecaptionConfig):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        assert cfg.model
        self.device = _resolve_device(cfg.device)
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(cfg.model)
            self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ValueError(f"transformers captioner: cannot load {cfg.model!r} as an image-to-text "
                             f"model with AutoProcessor + AutoModelForImageTextToText: {exc}") from exc
        self.model.to(self.device).eval()
        # some processors (BLIP's) drop the template on load and only their tokenizer keeps it
        tok = getattr(self.processor, "tokenizer", None)
        self.chat_template = getattr(self.processor, "chat_template", None) or getattr(tok, "chat_template", None)
        self.chat = bool(self.chat_template)
        self.prompt = cfg.prompt if cfg.prompt or not self.chat else self.DEFAULT_CHAT_PROMPT
        self.max_new_tokens = cfg.max_new_tokens
        if tok is not None and not getattr(self.model.config, "is_encoder_decoder", False):
            tok.padding_side = "left"  # batched generation of decoder-only models appends on the right
        self.model_id = f"{cfg.model}@{_model_revision(cfg.model, self.model)}"

    def _inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.chat:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(msgs, chat_template=self.chat_template,
                                                      add_generation_prompt=True, tokenize=False)
            kwargs.update(text=[text] * len(images), padding=True)
        elif self.prompt:
            kwargs.update(text=[self.prompt] * len(images), padding=True)
        return self.processor(**kwargs)

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        if not images:
            return []
        inputs = self._inputs([im.convert("RGB") for im in images])
        dtype = self.model.dtype
        moved = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                 if torch.is_tensor(v) else v for k, v in inputs.items()}
        ids = moved.get("input_ids")
        ids = ids.clone() if ids is not None else None  # BLIP's generate edits its input_ids in place
        with torch.inference_mode():
            out = self.model.generate(**moved, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      num_beams=1)
        if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids):
            out = out[:, ids.shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


register_captioner("world_detector", WorldDetectorCaptioner)
register_captioner("clip_retrieval", ClipRetrievalCaptioner)
register_captioner("transformers", TransformersCaptioner)


# --------------------------------------------------------------------------- policies


def mix_coin(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): the same key gets the same draw in every run,
    whatever the row order, batch size or subset of keys."""
    return int(stable_hash({"seed": seed, "key": key, "what": "recaption-mix"}, 13), 16) / 16 ** 13


def choose_caption(key: str, original: str | None, generated: str | None, cfg: RecaptionConfig) -> tuple[str, str]:
    """Return ``(final caption, source)`` for one row under ``cfg.policy``.

    * replace / keep_both: the generated caption (keep_both differs downstream: the shard stage
      stores ``original_caption`` too, so training can sample either);
    * mix: the generated caption with probability ``mix_probability`` (per-key seeded coin).
    An empty or missing generated caption never replaces the original.
    """
    original = original or ""
    if not generated:
        return original, "original"
    if cfg.policy == "mix" and mix_coin(cfg.seed, key) >= cfg.mix_probability:
        return original, "original"
    return generated, "generated"


# --------------------------------------------------------------------------- the stage


def _decode(data: bytes | None) -> Image.Image | None:
    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable image"
        return None


def run_recaption(images_dir: Path, keys: list[str] | None, cfg: RecaptionConfig, out_path: Path,
                  captioner: Captioner | None = None, progress: bool = True) -> dict[str, Any]:
    """Caption the images in ``images_dir/part-*.parquet`` and write ``out_path`` (parquet).

    ``keys`` restricts the work to those rows (e.g. the ones that survived filtering); every
    requested key must exist.  Row groups are streamed, so memory stays at one row group plus one
    batch.  Rows whose image cannot be decoded keep their original caption and are counted.
    ``captioner`` lets a caller reuse an already loaded model; it must match ``cfg.backend``.
    The output is written to a temporary file and renamed, so a killed run leaves nothing behind.
    """
    images_dir, out_path = Path(images_dir), Path(out_path)
    parts = sorted(images_dir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no image parts (part-*.parquet) in {images_dir}")
    for part in parts:
        missing = {"key", "image", "caption"} - set(pq.read_schema(part).names)
        if missing:
            raise ValueError(f"image part {part} lacks columns {sorted(missing)}")
    wanted: set[str] | None = None
    if keys is not None:
        wanted = set(keys)
        if len(wanted) != len(keys):
            log.warning("recaption: %d duplicate keys in the key list ignored", len(keys) - len(wanted))
    cap = captioner or build_captioner(cfg)
    total = len(wanted) if wanted is not None else sum(pq.ParquetFile(p).metadata.num_rows for p in parts)

    counts: Counter[str] = Counter()
    seen: set[str] = set()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    meta = {b"recaption_policy": cfg.policy.encode(), b"recaption_config": stable_hash(cfg).encode()}
    writer = pq.ParquetWriter(tmp, OUTPUT_SCHEMA.with_metadata(meta))
    bar = tqdm(total=total, desc=f"recaption[{cap.name}]", unit="img", disable=not progress)
    try:
        for part in parts:
            pf = pq.ParquetFile(part)
            for rg in range(pf.num_row_groups):
                # keys + captions first, so row groups with no wanted key are never decoded
                head = pf.read_row_group(rg, columns=["key", "caption"])
                rg_keys = head.column("key").to_pylist()
                take = [i for i, k in enumerate(rg_keys) if wanted is None or k in wanted]
                if not take:
                    continue
                blobs = pf.read_row_group(rg, columns=["image"]).column("image")
                alts = head.column("caption").to_pylist()
                for start in range(0, len(take), cfg.batch_size):
                    idx = take[start:start + cfg.batch_size]
                    rows = _caption_rows(cap, cfg, [rg_keys[i] for i in idx], [alts[i] for i in idx],
                                         [blobs[i].as_py() for i in idx], part, seen, counts)
                    writer.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
                    bar.update(len(idx))
        writer.close()
        if wanted is not None and len(seen) != len(wanted):
            absent = sorted(wanted - seen)
            raise KeyError(f"{len(absent)} requested keys are not in {images_dir}: {absent[:5]}")
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return {
        "rows": len(seen), "generated": counts["generated"], "original": counts["original"],
        "empty_generated": counts["empty_generated"], "undecodable": counts["undecodable"],
        "captioner": cap.name, "captioner_model": cap.model_id, "captioner_prompt": cap.prompt,
        "policy": cfg.policy,
    }


def _caption_rows(cap: Captioner, cfg: RecaptionConfig, keys: list[str], alts: list[str | None],
                  blobs: list[bytes | None], part: Path, seen: set[str], counts: Counter[str]) -> list[dict]:
    for k in keys:
        if k in seen:
            raise ValueError(f"duplicate key {k!r} in image parts (again in {part.name})")
        seen.add(k)
    images = [_decode(b) for b in blobs]
    ok = [i for i, im in enumerate(images) if im is not None]
    for i in set(range(len(keys))) - set(ok):
        log.warning("recaption: image of key %r in %s cannot be decoded; original caption kept", keys[i], part.name)
    counts["undecodable"] += len(keys) - len(ok)
    generated: list[str | None] = [None] * len(keys)
    for i, text in zip(ok, _checked_captions(cap, [images[i] for i in ok]) if ok else []):
        generated[i] = text
        counts["empty_generated"] += not text
    rows = []
    for k, alt, gen in zip(keys, alts, generated):
        final, source = choose_caption(k, alt, gen, cfg)
        counts[source] += 1
        rows.append({"key": k, "original_caption": alt, "generated_caption": gen, "caption": final,
                     "caption_source": source, "captioner": cap.name, "captioner_model": cap.model_id,
                     "captioner_prompt": cap.prompt})
    return rows
