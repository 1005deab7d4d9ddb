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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.filters.aesthetic import AestheticConfig
from imagegen.filters.blocklist import HashBlocklistConfig
from imagegen.filters.nsfw import NudeNetConfig
from imagegen.filters.ocr import OcrConfig
from imagegen.filters.watermark import WatermarkConfig
from imagegen.stages.ledger import read_ledger
from imagegen.executors import StageRunner, map_step, thread_caps, worker_threads

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
    runner: StageRunner = None

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

    def score(self, data: FilterInput) -> np.ndarray:
        return np.asarray(self.scorer(data), dtype=np.float64)

    def decide(self, s: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        ok = np.ones(len(s), dtype=bool)
        if self.minimum is not None:
            ok &= s >= self.minimum
        if self.maximum is not None:
            ok &= s <= self.maximum
        return ok

    def __call__(self, data: FilterInput, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.score(data)
        return s, self.decide(s, candidates)


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

    def score(self, data: FilterInput) -> np.ndarray:
        from imagegen.clip import cosine, encode_texts

        clip, img = data.clip_images(self.resolve(self.cfg.model), self.cfg.batch_size)
        txt = encode_texts(clip, data.table["caption"].fillna("").tolist())
        return cosine(img, txt)

    def __call__(self, data: FilterInput, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score = self.score(data)
        return score, self.decide(score, candidates)

    def decide(self, score: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Threshold, or the top fraction of the candidates (a global rule over the score column)."""
        if self.cfg.mode == "threshold":
            return score >= self.cfg.threshold
        ok = np.zeros(len(score), dtype=bool)
        idx = np.flatnonzero(candidates)
        n_keep = int(round(self.cfg.top_fraction * len(idx)))
        if n_keep:
            # stable ranking: ties broken by row order, so the decision is deterministic
            order = idx[np.argsort(-score[idx], kind="stable")][:n_keep]
            ok[order] = True
        return ok


@dataclass
class ZeroShotFilter:
    cfg: ZeroShotFilterConfig
    resolve: Callable[[str], str]
    name: str = "zero_shot"

    def __call__(self, data: FilterInput, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.score(data)
        return p, self.decide(p, candidates)

    def decide(self, p_reject: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return p_reject < self.cfg.threshold

    def score(self, data: FilterInput) -> np.ndarray:
        from imagegen.clip import encode_texts

        clip, img = data.clip_images(self.resolve(self.cfg.model), self.cfg.batch_size)
        prompts = self.cfg.reject_prompts + self.cfg.accept_prompts
        txt = encode_texts(clip, prompts)
        logits = 100.0 * img @ txt.T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return p[:, : len(self.cfg.reject_prompts)].sum(axis=1)


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

def model_specs(cfg: FilterConfig) -> list[str]:
    """The open_clip specs the configured CLIP-based filters name (resolved by the caller)."""
    specs = [getattr(cfg, k).model for k in ("clip_score", "nsfw", "watermark", "text") if getattr(cfg, k)]
    if cfg.aesthetic is not None and getattr(cfg.aesthetic, "model", None):
        specs.append(cfg.aesthetic.model)
    return sorted(set(specs))


@dataclass
class ScoreJob:
    """One image part to score: its path, its rows' ledger columns, the filters' config."""
    part: str
    meta: pd.DataFrame                     # key, row_id, original_width, original_height
    cfg: FilterConfig
    models: dict[str, str]                 # open_clip spec -> resolved spec ('world' -> local-dir:...)
    out_path: str | None = None            # where the part's scores go (atomic); None: return only


def _decided_by_score(f: Any) -> bool:
    return callable(getattr(f, "score", None)) and callable(getattr(f, "decide", None))


def _score_key(job: ScoreJob) -> dict[str, Any] | None:
    """A part's scores are cached only under a part cache: its path names the filter parameters, the
    filters' code and models (``imagegen.curate.filter_stage``); the part's bytes and ledger rows too."""
    from imagegen.hashing import file_sha256, stable_hash

    if job.out_path is None:
        return None
    meta = job.meta.sort_values("key").astype(str).to_dict("list")
    return {"out": job.out_path, "part": file_sha256(job.part), "meta": stable_hash(meta, 32)}


def _score_uses_model(job: ScoreJob) -> bool:
    return bool(model_specs(job.cfg))  # CLIP-backed filters (clip_score, zero-shot, aesthetic)


@map_step("filter-score", key=_score_key, outputs=lambda job: [job.out_path] if job.out_path else [],
          model=_score_uses_model)
def score_part(job: ScoreJob) -> pd.DataFrame:
    """The map step of the filter stage: every filter's score (and extra columns) on one part.

    Depends only on the part's rows.  Filters without a separate ``score``/``decide`` (custom
    ones following the older ``f(data, candidates)`` protocol) decide here, per row, and their
    decision is kept as ``<name>_pass``."""
    import multiprocessing

    if multiprocessing.parent_process() is not None or _in_cluster_worker():
        _single_thread_torch()  # parallelism comes from the parts; one intra-op thread per worker
    models = dict(job.models)
    filters = build_filters(job.cfg, lambda spec: models.get(spec, spec))
    imgs = pq.read_table(job.part, columns=["key", "image", "caption"]).to_pandas()
    table = imgs[["key", "caption"]].merge(job.meta, on="key", how="left", validate="one_to_one")
    missing = table["row_id"].isna()
    if missing.any():
        raise ValueError(f"image part {job.part}: {int(missing.sum())} image(s) have no 'success' row in the "
                         f"ledger (e.g. keys {table.loc[missing, 'key'].head(5).tolist()})")
    data = FilterInput(table=table, image_bytes=imgs["image"].tolist())
    del imgs
    out = table[["key", "row_id"]].copy()
    ones = np.ones(len(table), dtype=bool)
    for f in filters:
        if _decided_by_score(f):
            out[f"{f.name}_score"] = np.asarray(f.score(data), dtype=np.float64)
        else:
            score, ok = f(data, ones.copy())
            out[f"{f.name}_score"] = np.asarray(score, dtype=np.float64)
            out[f"{f.name}_pass"] = np.asarray(ok, dtype=bool)
        extra = getattr(f, "extra_columns", None)
        if extra is not None:
            for col, values in extra(data).items():
                out[col] = list(values)
    if job.out_path is not None:
        dest = Path(job.out_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        try:
            out.to_parquet(tmp, index=False)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _in_cluster_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except Exception:  # not installed, or not inside a Dask worker
        return False


def _single_thread_torch() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def run_filter(download_dir: Path, dedup_path: Path | None, cfg: FilterConfig, out_path: Path,
               resolve_model: Callable[[str], str] = lambda s: s, runner: str | None = None,
               part_cache: Path | None = None, part_key: Callable[[Path], str] | None = None) -> dict[str, Any]:
    """Score every downloaded image with every filter (per part), then decide (globally).

    Writes ``out_path`` (parquet): key, row_id, ``<filter>_score`` and ``<filter>_pass`` per
    filter, the filters' extra columns (``text_ocr_text``, ...), ``keep`` and ``reason`` (None when
    kept; "<kind>_duplicate" or the first failing filter).  Scoring is a map step over the image
    parts on ``runner`` (:mod:`imagegen.executors`); with ``part_cache`` and ``part_key(part path)``
    each part's scores are kept under ``part_cache/<key>.parquet`` and reused by a rerun.  The
    decision sees only the compact score columns, sorted by key.
    """
    from imagegen.executors import executor

    ledger = read_ledger(download_dir, ["key", "row_id", "status", "original_width", "original_height"])
    meta = ledger[ledger["status"] == "success"][["key", "row_id", "original_width", "original_height"]]
    del ledger
    parts = sorted((download_dir / "images").glob("part-*.parquet"))
    models = {spec: resolve_model(spec) for spec in model_specs(cfg)}
    jobs, cached = [], {}
    for part in parts:
        keys = pq.read_table(part, columns=["key"]).column("key").to_pylist()
        dest = str(part_cache / f"{part_key(part)}.parquet") if part_cache is not None and part_key else None
        if dest is not None and Path(dest).is_file():
            cached[part.name] = dest
            continue
        jobs.append(ScoreJob(str(part), meta[meta["key"].isin(keys)], cfg, models, dest))
    spec = runner or "local"
    if len(jobs) <= 1 or spec == "local:1":
        with thread_caps(worker_threads(1)):  # one worker, this process: every core unless map_threads says
            frames = [score_part(j) for j in jobs]
    else:
        with executor(spec, root=Path(out_path).parent) as ex:
            frames = ex.map(score_part, jobs)
    frames += [pd.read_parquet(p) for p in cached.values()]
    build = build_filters(cfg, lambda spec_: models.get(spec_, spec_))
    cols = ["key", "row_id"] + [f"{f.name}_score" for f in build]
    scores = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols))
    scores = scores.sort_values("key", kind="stable").reset_index(drop=True)
    if part_cache is not None:
        log.info("filter: %d part(s) scored, %d reused", len(jobs), len(cached))

    out = scores[["key", "row_id"]].copy()
    n = len(out)
    keep = np.ones(n, dtype=bool)
    reason = np.full(n, None, dtype=object)
    if cfg.drop_duplicates and dedup_path is not None:
        dd = pd.read_parquet(dedup_path, columns=["key", "is_representative", "dup_kind"]).set_index("key")
        rep = dd.loc[out["key"], "is_representative"].to_numpy(bool)
        kind = dd.loc[out["key"], "dup_kind"].to_numpy(object)
        out["duplicate"] = ~rep
        reason[~rep] = [f"{k}_duplicate" for k in kind[~rep]]
        keep &= rep
    extra_cols = [c for c in scores.columns if c not in out.columns and not c.endswith(("_score", "_pass"))]
    for f in build:
        score = scores[f"{f.name}_score"].to_numpy(np.float64)
        if _decided_by_score(f):
            ok = np.asarray(f.decide(score, keep.copy()), dtype=bool)
        else:
            ok = scores[f"{f.name}_pass"].to_numpy(bool)
        out[f"{f.name}_score"] = score
        out[f"{f.name}_pass"] = ok
        newly = keep & ~ok
        reason[newly] = f.name
        keep &= ok
        log.info("filter %s: rejected %d", f.name, int(newly.sum()))
    for c in extra_cols:
        out[c] = scores[c].to_numpy()
    out["keep"] = keep
    out["reason"] = reason
    out.to_parquet(out_path, index=False)
    dropped = pd.Series(reason[~keep]).value_counts().to_dict()
    counts = {"images": int(len(out)), "kept": int(keep.sum()),
              "dropped": {str(k): int(v) for k, v in sorted(dropped.items())}}
    if part_cache is not None:
        counts["parts"] = {"scored": len(jobs), "reused": len(cached)}
    return counts
