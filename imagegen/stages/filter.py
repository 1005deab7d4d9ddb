"""Filter stage: composable filters, each writing its score, its decision and its reason.

Filters run on every downloaded image (scores are useful even for rows dropped earlier), and
the final decision applies them in order: the first filter that rejects a row names the reason.
Built in: minimum side and maximum aspect ratio (on the original, upright size), low information
(pixel standard deviation and histogram entropy), CLIP image-text similarity (threshold, or keep
the top fraction as DataComp does), CLIP zero-shot prompts for NSFW, watermarks and rendered text
(a heuristic), and the real detectors of :mod:`imagegen.filters`: NudeNet (NSFW), RapidOCR (text
coverage), LAION's aesthetic predictor, a watermark classifier by path, and a hash blocklist.
Users add their own with :func:`register_filter` or a ``"package.module:factory"`` path.
"""

from __future__ import annotations

import importlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.filters.aesthetic import AestheticConfig
from imagegen.filters.blocklist import HashBlocklistConfig
from imagegen.filters.nsfw import NudeNetConfig
from imagegen.filters.ocr import OcrConfig
from imagegen.filters.watermark import WatermarkConfig
from imagegen.stages.download import iter_images

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- configuration

class ClipScoreFilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("world", description="open_clip spec: 'NAME:PRETRAINED', 'local-dir:PATH', "
                       "'hf-hub:ORG/REPO' or 'world' (the embedded world's reference CLIP)")
    mode: Literal["threshold", "top_fraction"] = "threshold"
    threshold: float = Field(0.2, ge=-1, le=1, description="Minimum cosine similarity (mode=threshold)")
    top_fraction: float = Field(0.3, gt=0, le=1, description="Fraction kept, DataComp-style (mode=top_fraction)")
    batch_size: int = Field(256, ge=1, le=65536)


class ZeroShotFilterConfig(BaseModel):
    """Reject an image when CLIP prefers the 'reject' prompts with probability above threshold."""
    model_config = ConfigDict(extra="forbid")
    model: str = "world"
    reject_prompts: list[str] = Field(min_length=1)
    accept_prompts: list[str] = Field(min_length=1)
    threshold: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(256, ge=1, le=65536)


NSFW_PROMPTS = (["an explicit nude photo", "pornographic content", "a graphic violent image"],
                ["a safe-for-work photo", "an ordinary photo", "a picture of objects"])
WATERMARK_PROMPTS = (["a photo with a watermark", "a stock photo with a logo watermark across it"],
                     ["a clean photo without any watermark"])
TEXT_PROMPTS = (["an image containing written text", "a screenshot of a document", "a sign with letters"],
                ["a photo with no text in it"])


class FilterConfig(BaseModel):
    """Which filters run, in order.  ``None`` switches a filter off."""
    model_config = ConfigDict(extra="forbid")

    drop_duplicates: bool = Field(True, description="Drop rows the dedup stage marked as duplicates")
    min_side: int | None = Field(32, ge=1, description="Minimum original side in pixels")
    max_aspect_ratio: float | None = Field(3.0, ge=1, description="Maximum long/short side ratio")
    min_pixel_std: float | None = Field(2.0, ge=0, description="Blank: minimum pixel std of the most varied "
                                        "RGB channel (a luminance std misses objects as bright as the background)")
    min_entropy: float | None = Field(None, ge=0, le=12, description="Low information: minimum entropy (bits) "
                                      "of the 4-bit-per-channel colour histogram; off by default because "
                                      "simple images (one object on a plain background) score well under 1 bit")
    clip_score: ClipScoreFilterConfig | None = Field(default_factory=ClipScoreFilterConfig)
    nsfw: ZeroShotFilterConfig | None = Field(None, description="Heuristic: CLIP zero-shot NSFW prompts")
    watermark: ZeroShotFilterConfig | None = Field(None, description="Heuristic: CLIP zero-shot watermark prompts")
    text: ZeroShotFilterConfig | None = Field(None, description="Heuristic: CLIP zero-shot rendered-text prompts")
    hash_blocklist: HashBlocklistConfig | None = Field(None, description="Known-bad perceptual/sha256 hashes "
                                                       "(reason 'hash_blocklist'); runs first")
    nsfw_nudenet: NudeNetConfig | None = Field(None, description="NudeNet NSFW detector, shipped with the "
                                               "nudenet wheel (reason 'nsfw_nudenet')")
    text_ocr: OcrConfig | None = Field(None, description="RapidOCR text coverage, models shipped with "
                                       "rapidocr-onnxruntime (reason 'text_ocr')")
    watermark_classifier: WatermarkConfig | None = Field(None, description="Watermark classifier by path "
                                                         "(reason 'watermark_classifier')")
    aesthetic: AestheticConfig | None = Field(None, description="LAION aesthetic predictor by path "
                                              "(reason 'aesthetic')")
    custom: list[str] = Field(default_factory=list, description="'package.module:factory' filters, run last")

    @model_validator(mode="after")
    def _check_custom(self) -> "FilterConfig":
        for spec in self.custom:
            if ":" not in spec and spec not in _REGISTRY:
                raise ValueError(f"custom filter {spec!r} must be a registered name or 'package.module:factory'")
        return self

    @staticmethod
    def zero_shot(kind: Literal["nsfw", "watermark", "text"], model: str = "world",
                  threshold: float = 0.5) -> ZeroShotFilterConfig:
        rej, acc = {"nsfw": NSFW_PROMPTS, "watermark": WATERMARK_PROMPTS, "text": TEXT_PROMPTS}[kind]
        return ZeroShotFilterConfig(model=model, reject_prompts=rej, accept_prompts=acc, threshold=threshold)


# ---------------------------------------------------------------------------- the filter contract

@dataclass
class FilterInput:
    """What a filter sees: one row per downloaded image, images decoded lazily once."""
    table: pd.DataFrame            # key, row_id, caption, original_width, original_height, ...
    image_bytes: list[bytes]
    _decoded: list[Image.Image] | None = field(default=None, repr=False)
    _embedded: dict[str, tuple[Any, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def images(self) -> list[Image.Image]:
        if self._decoded is None:
            self._decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in self.image_bytes]
        return self._decoded

    def clip_images(self, spec: str, batch_size: int) -> tuple[Any, np.ndarray]:
        """(the loaded CLIP, image embeddings), computed once per model for all model filters."""
        if spec not in self._embedded:
            from imagegen.clip import encode_images, load_clip

            clip = load_clip(spec)
            self._embedded[spec] = (clip, encode_images(clip, self.images, batch_size=batch_size))
        return self._embedded[spec]


class Filter(Protocol):
    name: str

    def __call__(self, data: FilterInput, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (score, passes) arrays over all rows; ``candidates`` marks rows still in play
        (ranking filters such as top-fraction rank only among them)."""


@dataclass
class ThresholdFilter:
    name: str
    scorer: Callable[[FilterInput], np.ndarray]
    minimum: float | None = None
    maximum: float | None = None

    def __call__(self, data: FilterInput, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.asarray(self.scorer(data), dtype=np.float64)
        ok = np.ones(len(s), dtype=bool)
        if self.minimum is not None:
            ok &= s >= self.minimum
        if self.maximum is not None:
            ok &= s <= self.maximum
        return s, ok


def _min_side(d: FilterInput) -> np.ndarray:
    return np.minimum(d.table["original_width"].to_numpy(float), d.table["original_height"].to_numpy(float))


def _aspect(d: FilterInput) -> np.ndarray:
    w, h = d.table["original_width"].to_numpy(float), d.table["original_height"].to_numpy(float)
    return np.maximum(w, h) / np.maximum(np.minimum(w, h), 1.0)


def pixel_std(d: FilterInput) -> np.ndarray:
    """Std of the most varied RGB channel: 0 for a solid image, whatever its colour."""
    return np.array([np.asarray(im, dtype=np.float64).reshape(-1, 3).std(axis=0).max() for im in d.images])


def entropy_bits(d: FilterInput) -> np.ndarray:
    """Shannon entropy of the colour histogram quantised to 4 bits per channel (0..12 bits)."""
    out = []
    for im in d.images:
        q = np.asarray(im, dtype=np.uint16).reshape(-1, 3) >> 4
        codes = (q[:, 0] << 8) | (q[:, 1] << 4) | q[:, 2]
        p = np.bincount(codes, minlength=4096) / len(codes)
        p = p[p > 0]
        out.append(float(-(p * np.log2(p)).sum()))
    return np.array(out)


@dataclass
class ClipScoreFilter:
    cfg: ClipScoreFilterConfig
    resolve: Callable[[str], str]
    name: str = "clip_score"

    def __call__(self, data: FilterInput, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from imagegen.clip import cosine, encode_texts

        clip, img = data.clip_images(self.resolve(self.cfg.model), self.cfg.batch_size)
        txt = encode_texts(clip, data.table["caption"].fillna("").tolist())
        score = cosine(img, txt)
        if self.cfg.mode == "threshold":
            return score, score >= self.cfg.threshold
        ok = np.zeros(len(score), dtype=bool)
        idx = np.flatnonzero(candidates)
        n_keep = int(round(self.cfg.top_fraction * len(idx)))
        if n_keep:
            # stable ranking: ties broken by row order, so the decision is deterministic
            order = idx[np.argsort(-score[idx], kind="stable")][:n_keep]
            ok[order] = True
        return score, ok


@dataclass
class ZeroShotFilter:
    cfg: ZeroShotFilterConfig
    resolve: Callable[[str], str]
    name: str = "zero_shot"

    def __call__(self, data: FilterInput, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from imagegen.clip import encode_texts

        clip, img = data.clip_images(self.resolve(self.cfg.model), self.cfg.batch_size)
        prompts = self.cfg.reject_prompts + self.cfg.accept_prompts
        txt = encode_texts(clip, prompts)
        logits = 100.0 * img @ txt.T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p_reject = p[:, : len(self.cfg.reject_prompts)].sum(axis=1)
        return p_reject, p_reject < self.cfg.threshold


_REGISTRY: dict[str, Callable[[], Filter]] = {}


def register_filter(name: str, factory: Callable[[], Filter]) -> None:
    """Make ``name`` usable in ``FilterConfig.custom``."""
    _REGISTRY[name] = factory


def _load_custom(spec: str) -> Filter:
    if spec in _REGISTRY:
        return _REGISTRY[spec]()
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"custom filter {spec!r} could not be loaded: {exc}") from exc
    return factory()


def build_filters(cfg: FilterConfig, resolve_model: Callable[[str], str] = lambda s: s) -> list[Filter]:
    """The configured filters, in the order they decide."""
    from imagegen.filters.base import as_stage_filter

    fs: list[Filter] = []
    if cfg.hash_blocklist is not None:  # a listed image is dropped as listed, whatever else is wrong with it
        from imagegen.filters.blocklist import HashBlocklistFilter

        fs.append(as_stage_filter(HashBlocklistFilter(cfg.hash_blocklist)))
    if cfg.max_aspect_ratio is not None:  # before min_side: a 256x16 strip is a shape problem first
        fs.append(ThresholdFilter("aspect_ratio", _aspect, maximum=cfg.max_aspect_ratio))
    if cfg.min_side is not None:
        fs.append(ThresholdFilter("min_side", _min_side, minimum=cfg.min_side))
    if cfg.min_pixel_std is not None:
        fs.append(ThresholdFilter("pixel_std", pixel_std, minimum=cfg.min_pixel_std))
    if cfg.min_entropy is not None:
        fs.append(ThresholdFilter("entropy", entropy_bits, minimum=cfg.min_entropy))
    if cfg.nsfw_nudenet is not None:
        from imagegen.filters.nsfw import NudeNetFilter

        fs.append(as_stage_filter(NudeNetFilter(cfg.nsfw_nudenet)))
    if cfg.text_ocr is not None:
        from imagegen.filters.ocr import OcrFilter

        fs.append(as_stage_filter(OcrFilter(cfg.text_ocr)))
    if cfg.watermark_classifier is not None:
        from imagegen.filters.watermark import WatermarkFilter

        fs.append(as_stage_filter(WatermarkFilter(cfg.watermark_classifier)))
    for kind in ("nsfw", "watermark", "text"):
        sub = getattr(cfg, kind)
        if sub is not None:
            fs.append(ZeroShotFilter(sub, resolve_model, name=kind))
    if cfg.aesthetic is not None:
        from imagegen.filters.aesthetic import AestheticFilter

        fs.append(as_stage_filter(AestheticFilter(cfg.aesthetic, resolve_model)))
    if cfg.clip_score is not None:
        fs.append(ClipScoreFilter(cfg.clip_score, resolve_model))
    fs.extend(_load_custom(s) for s in cfg.custom)
    return fs


# ---------------------------------------------------------------------------- the stage

def run_filter(download_dir: Path, dedup_path: Path | None, cfg: FilterConfig, out_path: Path,
               resolve_model: Callable[[str], str] = lambda s: s) -> dict[str, Any]:
    """Score every downloaded image with every filter and decide.

    Writes ``out_path`` (parquet): key, row_id, ``<filter>_score`` and ``<filter>_pass`` per
    filter, ``keep`` and ``reason`` (None when kept; "duplicate" or the first failing filter).
    """
    ledger = pd.read_parquet(download_dir / "ledger.parquet")
    meta = ledger[ledger["status"] == "success"][["key", "row_id", "original_width", "original_height"]]
    parts = [b.to_pandas() for b in iter_images(download_dir / "images", ["key", "image", "caption"])]
    imgs = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["key", "image", "caption"])
    table = imgs[["key", "caption"]].merge(meta, on="key", how="left", validate="one_to_one")
    data = FilterInput(table=table, image_bytes=imgs["image"].tolist())

    out = table[["key", "row_id"]].copy()
    keep = np.ones(len(table), dtype=bool)
    reason = np.full(len(table), None, dtype=object)
    if cfg.drop_duplicates and dedup_path is not None:
        dd = pd.read_parquet(dedup_path, columns=["key", "is_representative", "dup_kind"]).set_index("key")
        rep = dd.loc[table["key"], "is_representative"].to_numpy(bool)
        kind = dd.loc[table["key"], "dup_kind"].to_numpy(object)
        out["duplicate"] = ~rep
        reason[~rep] = [f"{k}_duplicate" for k in kind[~rep]]
        keep &= rep
    for f in build_filters(cfg, resolve_model):
        score, ok = f(data, keep.copy())
        out[f"{f.name}_score"] = score
        out[f"{f.name}_pass"] = ok
        newly = keep & ~ok
        reason[newly] = f.name
        keep &= ok
        log.info("filter %s: rejected %d", f.name, int(newly.sum()))
    out["keep"] = keep
    out["reason"] = reason
    out.to_parquet(out_path, index=False)
    dropped = pd.Series(reason[~keep]).value_counts().to_dict()
    return {"images": int(len(out)), "kept": int(keep.sum()),
            "dropped": {str(k): int(v) for k, v in sorted(dropped.items())}}
