"""``imagegen import``: bring an existing image dataset into the registry.

An import is an ordinary content-addressed dataset (``datasets/<id>/``: WebDataset shards written
by :mod:`imagegen.stages.shard`, ``manifest.parquet``, ``accounting.parquet``, ``card.json``,
``samples.png``), so every family, the loader and every metric read it as they read a curated
one.  Its id hashes the input rows' content (sha256 of each image's bytes, caption, label, in
input order), the import parameters and this code; where the input lives (paths, URLs) is
recorded in the card but not hashed, so moving a folder keeps the id.

* Sources (:mod:`imagegen.importers.sources`): an image folder (class sub-folders = labels,
  ``captions.jsonl`` or sidecar ``.txt`` captions), WebDataset tars (img2dataset output folders,
  path/brace/glob patterns, http(s) URLs), a Hugging Face dataset (``load_from_disk`` folder or
  a cached name) with the user's image/caption/label columns.
* Bytes: JPEG and PNG images are stored exactly as they came (no re-encode; the sha256 in the
  manifest equals the source file's); other formats (WebP, BMP, GIF, TIFF, PNM, HF arrays) are
  re-encoded once to PNG, losslessly, with EXIF orientation applied, and marked ``reencoded``.
  Images keep their size (non-square included); ``original_width``/``original_height`` record
  it as displayed (after EXIF orientation).
* Accounting: every input row gets one outcome (``kept``, ``skipped:<reason>`` for an image PIL
  cannot read or a sample without an image, ``filtered:<reason>`` when curated).
* ``curate=True`` sends the rows through the curate DAG's own dedup and filter stages (the import
  is written as a download-stage folder ``stages/import/<id>`` they read); otherwise the card says
  ``"curated": false`` (imported as-is).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.artifacts import is_complete, read_card, stage_output
from imagegen.hashing import bytes_sha256, code_version, stable_hash
from imagegen.importers.sources import (FolderSource, HFSource, ImportError_, Row, Source,  # noqa: F401
                                        WebDatasetSource)
from imagegen.paths import datasets_dir, ensure_writable, stage_dir
from imagegen.registry import DatasetRef, get_dataset, register_name
from imagegen.stages.dedup import DedupConfig
from imagegen.stages.filter import FilterConfig
from imagegen.stages.shard import ShardConfig

log = logging.getLogger(__name__)

PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
IMPORT_PART_ROWS = 10_000  # rows per image part of the download-layout folder --curate writes


def _default_filter() -> FilterConfig:
    # no CLIP score by default: 'world' (the default model) only exists for embedded-world data
    return FilterConfig(clip_score=None)


class ImportConfig(BaseModel):
    """Every parameter of ``imagegen import``; refused before any work when inconsistent."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["folder", "webdataset", "hf"] = Field(description="folder | webdataset | hf")
    source: str = Field(min_length=1, description="folder path; tar path/pattern/URL list; HF dataset path or name")
    name: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$",
                             description="Registry name (default: import-<kind>-<id prefix>)")
    # folder
    labels: Literal["auto", "subfolders", "none"] = Field(
        "auto", description="folder: class sub-folders as labels ('auto': when every image is in one)")
    captions: str | None = Field(None, description="folder: captions.jsonl (default <folder>/captions.jsonl if present)")
    caption_from_label: bool = Field(True, description="an image without a caption gets its class name")
    # webdataset
    caption_key: str | None = Field(None, description="webdataset: member extension of the caption (default txt)")
    label_field: str | None = Field(None, description="webdataset: field of the .json (or member ext) with the label")
    # Hugging Face
    image_column: str | None = Field(None, description="hf: the image column (required for kind=hf)")
    caption_column: str | None = Field(None, description="hf: the caption column")
    label_column: str | None = Field(None, description="hf: the label column (ClassLabel names are used)")
    split: str | None = Field(None, description="hf: split (needed when the dataset has several)")
    revision: str | None = Field(None, description="hf: dataset revision for load_dataset")
    cache_dir: str | None = Field(None, description="hf: datasets cache folder (default: the user's)")
    # curation
    curate: bool = Field(False, description="run the curate DAG's dedup and filter stages on the import")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    filter: FilterConfig = Field(default_factory=_default_filter)
    shard: ShardConfig = Field(default_factory=ShardConfig)

    @model_validator(mode="after")
    def _check(self) -> "ImportConfig":
        if self.kind == "hf" and not self.image_column:
            raise ValueError("kind='hf' needs image_column (the column holding the images)")
        if self.kind != "hf":
            given = [f for f in ("image_column", "caption_column", "label_column", "split", "revision")
                     if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{given} apply to kind='hf' only (kind is {self.kind!r})")
        if self.kind != "folder" and self.captions is not None:
            raise ValueError("captions (a captions.jsonl) applies to kind='folder'; webdataset captions come from "
                             "the .txt members (caption_key), HF captions from caption_column")
        return self


class ImportResult(BaseModel):
    dataset_id: str
    name: str
    path: str
    cached: bool
    counts: dict[str, Any]


def open_source(cfg: ImportConfig, root: Path) -> Source:
    if cfg.kind == "folder":
        return FolderSource(cfg.source, labels=cfg.labels, captions=cfg.captions,
                            caption_from_label=cfg.caption_from_label)
    if cfg.kind == "webdataset":
        return WebDatasetSource(cfg.source, fetch_dir=root / "stages" / "import_fetch", caption_key=cfg.caption_key,
                                label_field=cfg.label_field)
    return HFSource(cfg.source, image_column=str(cfg.image_column), caption_column=cfg.caption_column,
                    label_column=cfg.label_column, split=cfg.split, revision=cfg.revision, cache_dir=cfg.cache_dir)


# ------------------------------------------------------------------------------------------ images


def inspect_image(data: bytes) -> dict[str, Any]:
    """What the importer needs to know about one image's bytes; raises on bytes PIL cannot read."""
    img = Image.open(io.BytesIO(data))
    img.load()
    fmt = img.format or "?"
    orientation = img.getexif().get(0x0112, 1)
    w, h = img.size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    keep = fmt in ("JPEG", "PNG")
    return {"format": fmt, "mode": img.mode, "width": int(w), "height": int(h),
            "ext": {"JPEG": "jpg", "PNG": "png"}.get(fmt, "png"), "reencoded": not keep,
            "exif_transposed": orientation != 1}


def stored_bytes(data: bytes, info: dict[str, Any]) -> bytes:
    """The bytes written to the shard: the source bytes, or (other formats) one lossless PNG."""
    if not info["reencoded"]:
        return data
    img = Image.open(io.BytesIO(data))
    img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode not in PNG_MODES:
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ import


def _scan(src: Source, rows: list[Row]) -> tuple[list[dict[str, Any]], str]:
    """One pass over every row: hash and inspect its bytes (no image kept).  Returns per-row
    records and the content hash of all rows."""
    h = hashlib.sha256()
    recs = []
    for row in rows:
        rec: dict[str, Any] = {"row_id": row.row_id, "where": row.where, "caption": row.caption or "",
                               "label": row.label, "key": f"{row.row_id:09d}", "status": "success", "reason": None,
                               "error": None}
        try:
            data = src.read(row)
        except (OSError, ImportError_) as exc:
            rec.update(status="skipped", reason="no_image" if row.loc is None else "unreadable", error=str(exc))
            data = None
        if data is not None:
            rec["source_sha256"] = bytes_sha256(data)
            try:
                rec.update(inspect_image(data))
            except Exception as exc:  # PIL raises many types for bad bytes
                rec.update(status="skipped", reason="undecodable_image", error=f"{type(exc).__name__}: {exc}")
        h.update(json.dumps([rec.get("source_sha256"), rec["caption"], row.label, rec["status"]],
                            ensure_ascii=True).encode() + b"\n")
        recs.append(rec)
    return recs, h.hexdigest()


def _params(cfg: ImportConfig) -> dict[str, Any]:
    d = cfg.model_dump(mode="json", exclude={"source", "name", "cache_dir", "captions"})
    for k in ("dedup", "filter"):
        if not cfg.curate:
            d.pop(k)
        else:
            d[k].pop("processes", None)
            d[k].pop("batch_rows", None)
    return d


def _code() -> str:
    import imagegen.importers.sources as sources_mod
    import imagegen.stages.shard as shard_mod

    return code_version(sources_mod, shard_mod, __import__(__name__, fromlist=["x"]))


def _ledger(recs: list[dict[str, Any]]) -> pd.DataFrame:
    from imagegen.stages.download import LEDGER_COLUMNS

    rows = []
    for r in recs:
        ok = r["status"] == "success"
        rows.append({"row_id": r["row_id"], "url": r["where"], "caption": r["caption"], "status": r["status"],
                     "reason": r["reason"], "error": r["error"], "attempts": 1, "key": r["key"] if ok else None,
                     "original_width": r.get("width"), "original_height": r.get("height"),
                     "original_mode": r.get("mode"), "original_format": r.get("format"),
                     "exif_transposed": r.get("exif_transposed"), "width": r.get("width"), "height": r.get("height"),
                     "source_sha256": r.get("source_sha256"), "sha256": r.get("sha256")})
    led = pd.DataFrame(rows, columns=LEDGER_COLUMNS)
    for col in ("attempts", "original_width", "original_height", "width", "height"):
        led[col] = led[col].astype("Int64")
    led["exif_transposed"] = led["exif_transposed"].astype("boolean")
    return led


def _write_download_layout(out: Path, src: Source, rows: list[Row], recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The import as a download-stage folder (ledger + image parts), which dedup and filter read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imagegen.stages.download import IMAGE_SCHEMA as schema
    from imagegen.stages.download import LEDGER_SCHEMA, LedgerSummary
    from imagegen.stages.ledger import LedgerWriter

    (out / "images").mkdir(parents=True)
    ok = [(row, r) for row, r in zip(rows, recs) if r["status"] == "success"]
    for part, start in enumerate(range(0, max(len(ok), 1), IMPORT_PART_ROWS)):
        chunk = ok[start:start + IMPORT_PART_ROWS]
        cols: dict[str, list[Any]] = {n: [] for n in schema.names}
        for row, r in chunk:
            data = stored_bytes(src.read(row), r)
            r["sha256"] = bytes_sha256(data)
            for n, v in (("key", r["key"]), ("row_id", r["row_id"]), ("image", data), ("ext", r["ext"]),
                         ("sha256", r["sha256"]), ("width", r["width"]), ("height", r["height"]),
                         ("caption", r["caption"])):
                cols[n].append(v)
        pq.write_table(pa.table(cols, schema=schema), out / "images" / f"part-{part:05d}.parquet", row_group_size=1000)
    # the ledger a part at a time (never one frame of every row)
    writer = LedgerWriter(out, IMPORT_PART_ROWS, LEDGER_SCHEMA)
    summary = LedgerSummary()
    for start in range(0, len(recs), IMPORT_PART_ROWS):
        led = _ledger(recs[start:start + IMPORT_PART_ROWS])
        summary.add(led)
        writer.add(led)
    writer.close()
    return summary.result()


def import_dataset(cfg: ImportConfig | dict[str, Any], root: Path | str,
                   progress: Any = None) -> ImportResult:
    """Import ``cfg.source`` into the registry at ``root``; returns the dataset id and counts."""
    from imagegen.stages import shard as shard_mod

    if not isinstance(cfg, ImportConfig):
        cfg = ImportConfig(**cfg)
    root = ensure_writable(Path(root))
    note = progress or (lambda msg: None)
    t0 = time.time()
    src = open_source(cfg, root)
    rows = src.rows()
    note(f"[import] {len(rows)} input rows from {cfg.kind} {cfg.source}")
    recs, content = _scan(src, rows)
    params, code = _params(cfg), _code()
    import_id = stable_hash({"stage": "import", "content": content, "params": _params(cfg.model_copy(
        update={"curate": False})), "code": code})
    dataset_id = stable_hash({"stage": "import-dataset", "import": import_id, "params": params, "code": code})
    name = cfg.name or f"import-{cfg.kind}-{dataset_id[:8]}"
    final = datasets_dir(root) / dataset_id
    if is_complete(final):
        register_name(root, name, dataset_id)
        return ImportResult(dataset_id=dataset_id, name=name, path=str(final), cached=True,
                            counts=read_card(final).get("counts", {}))
    ok = [r for r in recs if r["status"] == "success"]
    if not ok:
        reasons = sorted({f"{r['reason']}: {r['error']}" for r in recs})[:3]
        raise ImportError_(f"none of the {len(recs)} input rows of {cfg.source} is a readable image: {reasons}")

    stage_ids: dict[str, str] = {}
    extra_meta: dict[str, dict[str, Any]] = {}
    outcome = {r["key"]: "kept" for r in ok}
    stage_counts: dict[str, Any] = {}
    if cfg.curate:
        from imagegen import curate as C  # the curate DAG's own dedup and filter stages (imports torch/open_clip)

        imp = C.StageResult("import", import_id, str(stage_dir(root, "import", import_id)))
        if is_complete(Path(imp.path)):
            imp = C.StageResult("import", import_id, imp.path, cached=True, counts=read_card(Path(imp.path))["counts"])
        else:
            with stage_output(Path(imp.path)) as (tmp, card):
                counts = _write_download_layout(tmp, src, rows, recs)
                card.update({"stage": "import", "id": import_id, "params": _params(cfg.model_copy(update={"curate": False})),
                             "code_version": code, "counts": counts, "source": src.describe()})
            imp = C.StageResult("import", import_id, imp.path, counts=counts)
        note(f"[import] import stage {import_id} -> {imp.path}")
        dd = C.dedup_stage(root, imp, cfg.dedup)
        note(f"[dedup] {'cached' if dd.cached else 'done'} {dd.id}")
        ff = C.filter_stage(root, imp, dd, cfg.filter, None)
        note(f"[filter] {'cached' if ff.cached else 'done'} {ff.id}")
        stage_ids = {"import": imp.id, "dedup": dd.id, "filter": ff.id}
        stage_counts = {"import": imp.counts, "dedup": dd.counts, "filter": ff.counts}
        ddf = pd.read_parquet(Path(dd.path) / "dedup.parquet").set_index("key")
        fff = pd.read_parquet(Path(ff.path) / "filter.parquet").set_index("key")
        score_cols = [c for c in fff.columns if c.endswith("_score")]
        for r in ok:
            k = r["key"]
            outcome[k] = "kept" if bool(fff.at[k, "keep"]) else f"filtered:{fff.at[k, 'reason']}"
            m = {"phash": ddf.at[k, "phash"], "near_cluster": ddf.at[k, "near_cluster"]}
            for c in score_cols:
                v = fff.at[k, c]
                m[c] = None if pd.isna(v) else float(v)
            extra_meta[k] = m

    by_key = {r["key"]: (row, r) for row, r in zip(rows, recs) if r["status"] == "success"}
    kept = [k for k in by_key if outcome[k] == "kept"]
    if not kept:
        raise ImportError_(f"curation kept none of the {len(ok)} readable images of {cfg.source}: "
                           f"{pd.Series(list(outcome.values())).value_counts().to_dict()}")
    classes = src.classes()
    if classes is None:
        labels = sorted({r["label"] for r in ok if r["label"] is not None})
        classes = labels or None

    def meta(k: str) -> dict[str, Any]:
        row, r = by_key[k]
        m: dict[str, Any] = {"row_id": r["row_id"], "source": r["where"], "original_width": r["width"],
                             "original_height": r["height"], "original_format": r["format"],
                             "original_mode": r["mode"], "reencoded": r["reencoded"],
                             "source_sha256": r["source_sha256"]}
        if r["label"] is not None:
            m["label"] = r["label"]
            if classes:
                m["label_index"] = classes.index(r["label"])
        m.update(extra_meta.get(k, {}))
        m.update({k2: v for k2, v in row.extra.items() if k2 not in ("source_meta",)})
        return m

    grid: dict[str, tuple[bytes, str]] = {}

    def get_sample(k: str) -> dict[str, Any]:
        row, r = by_key[k]
        data = stored_bytes(src.read(row), r)
        sha = bytes_sha256(data)
        if r.get("sha256") not in (None, sha):
            raise ImportError_(f"{r['where']} changed while it was imported (sha256 {r['sha256'][:12]} then {sha[:12]})")
        r["sha256"] = sha
        if len(grid) < 16:
            grid[k] = (data, r["ext"])
        m = meta(k)
        m["sha256"] = sha
        src_meta = row.extra.get("source_meta")
        if src_meta:
            m["source_meta"] = src_meta
        return {"key": k, "image": data, "ext": r["ext"], "caption": r["caption"], "meta": m}

    with stage_output(final) as (tmp, card):
        plan = shard_mod.plan_shards(kept, cfg.shard)
        infos = shard_mod.write_shards_from_plan(plan, get_sample, tmp / "shards", cfg.shard)
        shard_of = shard_mod.shard_of_keys(plan, infos)  # max_shard_bytes may split a planned shard
        manifest = pd.DataFrame([{"key": k, "shard": shard_of[k], **meta(k), "sha256": by_key[k][1]["sha256"],
                                  "caption": by_key[k][1]["caption"]} for k in kept])
        manifest.to_parquet(tmp / "manifest.parquet", index=False)
        acc = pd.DataFrame([{"row_id": r["row_id"], "url": r["where"], "key": r["key"] if r["status"] == "success" else None,
                             "status": r["status"], "reason": r["reason"],
                             "outcome": outcome[r["key"]] if r["status"] == "success" else f"skipped:{r['reason']}"}
                            for r in recs])
        if len(acc) != len(rows) or acc["outcome"].isna().any():
            raise AssertionError("import lost input rows")
        acc.to_parquet(tmp / "accounting.parquet", index=False)
        counts = {"input_rows": len(rows), "readable": len(ok),
                  "reencoded": int(sum(1 for k in kept if by_key[k][1]["reencoded"])),
                  "shard": {"samples": len(kept), "shards": len(infos), "bytes": int(sum(i.bytes for i in infos))},
                  "accounting": acc["outcome"].value_counts().sort_index().to_dict(), **stage_counts}
        sizes = {(by_key[k][1]["width"], by_key[k][1]["height"]) for k in kept}
        card.update({"id": dataset_id, "name": name, "kind": "images", "curated": cfg.curate,
                     "source": {**src.describe(), "kind": "import", "importer": cfg.kind},
                     "content_sha256": content, "import_id": import_id, "stage_ids": stage_ids,
                     "params": params, "code_version": code, "counts": counts, "classes": classes,
                     "image_sizes": {"distinct": len(sizes), "square": all(w == h for w, h in sizes),
                                     "min_side": min(min(s) for s in sizes), "max_side": max(max(s) for s in sizes)},
                     "shards": [{"name": i.name, "count": i.count, "bytes": i.bytes, "sha256": i.sha256} for i in infos],
                     "config": cfg.model_dump(mode="json"), "seconds": round(time.time() - t0, 3)})
        _write_grid(tmp / "samples.png", [(grid[k][0], by_key[k][1]["caption"]) for k in grid])
    register_name(root, name, dataset_id)
    note(f"[import] dataset {name} ({dataset_id}): {len(kept)} samples in {len(infos)} shards")
    return ImportResult(dataset_id=dataset_id, name=name, path=str(final), cached=False, counts=counts)


def _write_grid(path: Path, items: list[tuple[bytes, str]]) -> None:
    """The first samples (each fitted into a 128 px cell, aspect kept) with their captions."""
    from PIL import ImageDraw

    if not items:
        return
    cols, cell, text_h = 4, 128, 28
    rows = -(-len(items) // cols)
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (data, caption) in enumerate(items):
        im = Image.open(io.BytesIO(data))
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((cell, cell), Image.Resampling.BICUBIC if max(im.size) > cell else Image.Resampling.NEAREST)
        if max(im.size) < cell:  # small images (8 px digits) scaled up, pixels kept sharp
            f = cell / max(im.size)
            im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.NEAREST)
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        draw.text((x + 2, y + cell + 1), caption[:22], fill="black")
        draw.text((x + 2, y + cell + 13), caption[22:44], fill="black")
    grid.save(path)


def imported(root: Path | str, result: ImportResult) -> DatasetRef:
    return get_dataset(Path(root), result.dataset_id)
