"""The dataset's shards, written part-parallel: a global shuffle by key hash, then one task per shard.

The driver holds only compact columns: the kept keys with their planned shard (the seeded keyed-
hash permutation of :func:`imagegen.stages.shard.plan_shards`), the download part each key is in,
and the manifest's metadata columns.  Images move in two map steps (:func:`imagegen.executors.map_step`,
one Prefect task per item under the curate flow):

1. ``shard-route`` (one task per download part): read the part once and write, for every planned
   shard that has keys in it, a fragment ``spill/<shard>/<part>.parquet`` of (key, image, ext);
2. ``shard-write`` (one task per planned shard): read that shard's fragments and its metadata rows
   and write its tar(s) under provisional names (``max_shard_bytes`` may cut a planned shard in
   several).

The tars are then numbered in plan order (a tar's bytes never hold its own name), so names, bytes
and the manifest are those of the one-process writer (:func:`imagegen.stages.shard.write_shards_from_plan`)
whatever the runner.  A task's memory is one part's or one shard's images.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imagegen.artifacts import write_parquet_atomic
from imagegen.executors import executor, map_step
from imagegen.stages.shard import ShardConfig, ShardInfo, plan_shards, write_planned_shard

# the metadata each sample carries (its .json member and its row in the shard's parquet), in this order
LEDGER_META = ("row_id", "url")
CAPTION_META = ("original_caption", "generated_caption", "caption_source", "captioner", "captioner_model")
SIZE_META = ("original_width", "original_height", "sha256", "source_sha256")
DEDUP_META = ("phash", "near_cluster")
_SPILL_SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("ext", pa.string())])


def metadata_table(ledger: pd.DataFrame, dedup: pd.DataFrame, filtered: pd.DataFrame,
                   captions: pd.DataFrame, kept: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per kept key (in ``kept`` order): key, the samples' metadata columns, caption.
    Returns (table, score columns)."""
    score_cols = [c for c in filtered.columns if c.endswith("_score")]
    idx = pd.Index(kept, name="key")

    def pick(frame: pd.DataFrame, cols: tuple[str, ...] | list[str], what: str) -> pd.DataFrame:
        f = frame.drop_duplicates("key").set_index("key")
        missing = idx.difference(f.index)
        if len(missing):
            raise ValueError(f"{len(missing)} kept key(s) have no row in the {what}, e.g. {sorted(missing)[:5]}")
        return f.loc[idx, list(cols)]

    led = pick(ledger[ledger["key"].notna()], (*LEDGER_META, *SIZE_META), "download ledger")
    cap = pick(captions, (*CAPTION_META, "caption"), "captions")
    dd = pick(dedup, DEDUP_META, "dedup table")
    ff = pick(filtered, score_cols, "filter table")
    table = pd.DataFrame({"key": kept})
    for name in ("row_id", "url"):
        table[name] = led[name].to_numpy()
    for name in CAPTION_META:
        table[name] = cap[name].to_numpy()
    for name in SIZE_META:
        table[name] = led[name].to_numpy()
    for name in ("row_id", "original_width", "original_height"):
        table[name] = table[name].astype("int64")
    for name in DEDUP_META:
        table[name] = dd[name].to_numpy()
    for name in score_cols:
        table[name] = ff[name].to_numpy(dtype="float64")
    table["caption"] = cap["caption"].to_numpy()
    return table, score_cols


def _meta_of(row: dict[str, Any], score_cols: list[str]) -> dict[str, Any]:
    m = {k: row[k] for k in (*LEDGER_META, *CAPTION_META, *SIZE_META, *DEDUP_META, *score_cols)}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


# ---------------------------------------------------------------------------- the two map steps

@dataclass
class RouteJob:
    """One download part: send each of its kept images to its planned shard's fragment."""
    part: str          # images/part-NNNNN.parquet
    route: str         # parquet of (key, shard) for this part's kept keys
    spill: str         # folder of fragments: <spill>/<shard>/<part name>
    grid: list[str]    # keys whose images the dataset's sample grid shows (<= 16)
    grid_out: str


@map_step("shard-route")
def route_part(job: RouteJob) -> int:
    """Map step: one download part's kept images into per-shard fragments (atomic files); returns the count."""
    route = pq.read_table(job.route)
    shard_of = dict(zip(route.column("key").to_pylist(), route.column("shard").to_pylist()))
    del route
    want_grid = set(job.grid)
    rows: dict[int, list[tuple[str, bytes, str]]] = {}
    grid: list[tuple[str, bytes, str]] = []
    for batch in pq.ParquetFile(job.part).iter_batches(batch_size=1000, columns=["key", "image", "ext"]):
        for k, img, ext in zip(batch.column("key").to_pylist(), batch.column("image").to_pylist(),
                               batch.column("ext").to_pylist()):
            s = shard_of.get(k)
            if s is None:
                continue
            rows.setdefault(s, []).append((k, img, ext))
            if k in want_grid:
                grid.append((k, img, ext))
    n = 0
    name = Path(job.part).name
    for s, items in rows.items():
        n += len(items)
        write_parquet_atomic(_table(items), Path(job.spill) / f"{s:05d}" / name)
    if grid:
        write_parquet_atomic(_table(grid), Path(job.grid_out) / name)
    if n != len(shard_of):
        raise ValueError(f"{job.part}: {len(shard_of) - n} of its kept keys are not in the part")
    return n


@dataclass
class WriteJob:
    """One planned shard: its keys' metadata rows (in plan order) and the folder of its fragments."""
    index: int
    meta: str          # parquet: key, caption, metadata columns, in plan order
    spill: str         # folder holding this shard's fragments (one per download part)
    out: str           # where the tars go under provisional names
    cfg: ShardConfig
    score_cols: list[str]


@map_step("shard-write")
def write_part_shard(job: WriteJob) -> list[dict[str, Any]]:
    """Map step: write one planned shard (one tar, or several under ``max_shard_bytes``); returns the
    tars' infos under their provisional names ``<shard>-<j>.tar``."""
    images: dict[str, tuple[bytes, str]] = {}
    for frag in sorted(Path(job.spill).glob("*.parquet")):
        t = pq.read_table(frag)
        images.update(zip(t.column("key").to_pylist(), zip(t.column("image").to_pylist(), t.column("ext").to_pylist())))
        del t
    rows = pq.read_table(job.meta).to_pylist()
    keys = [r["key"] for r in rows]
    by_key = dict(zip(keys, rows))
    missing = [k for k in keys if k not in images]
    if missing:
        raise ValueError(f"planned shard {job.index}: {len(missing)} kept image(s) were not routed to it, "
                         f"e.g. {missing[:5]} (fragments in {job.spill})")

    def get_sample(key: str) -> dict[str, Any]:
        img, ext = images.pop(key)
        r = by_key[key]
        return {"key": key, "image": img, "ext": ext, "caption": r["caption"], "meta": _meta_of(r, job.score_cols)}

    out = Path(job.out)
    infos = write_planned_shard(keys, get_sample, out, job.cfg, lambda j: f"{job.index:05d}-{j:05d}.tar",
                                f"plan shard {job.index}")
    return [i.model_dump() for i in infos]


def _table(items: list[tuple[str, bytes, str]]) -> pa.Table:
    return pa.table({"key": [r[0] for r in items], "image": [r[1] for r in items], "ext": [r[2] for r in items]},
                    schema=_SPILL_SCHEMA)


# ---------------------------------------------------------------------------- the stage's driver

def write_dataset_shards(images_dir: Path, table: pd.DataFrame, score_cols: list[str], cfg: ShardConfig,
                         out_dir: Path, work: Path, runner: str = "local", grid_keys: list[str] | None = None
                         ) -> tuple[list[ShardInfo], pd.Series, dict[str, tuple[bytes, str]]]:
    """Shuffle ``table``'s keys (from :func:`metadata_table`) into planned shards, write them on
    ``runner`` and number the tars in plan order into ``out_dir``.

    Returns (the tars' infos, each key's tar name (a Series indexed by key), the grid keys' images)."""
    work = Path(work)
    plan = plan_shards(table["key"], cfg)
    order = pd.DataFrame({"key": [k for chunk in plan for k in chunk],
                          "shard": np.repeat(np.arange(len(plan), dtype=np.int64), [len(c) for c in plan])})
    # where each kept key lives: the key column of each part (compact)
    parts = sorted(Path(images_dir).glob("part-*.parquet"))
    located = pd.concat([pd.DataFrame({"key": pq.read_table(p, columns=["key"]).column("key").to_pylist(),
                                       "part": i}) for i, p in enumerate(parts)], ignore_index=True) \
        if parts else pd.DataFrame({"key": [], "part": []})
    located = located.drop_duplicates("key")
    route = order.merge(located, on="key", how="left")
    if route["part"].isna().any():
        lost = route.loc[route["part"].isna(), "key"].head(5).tolist()
        raise ValueError(f"{int(route['part'].isna().sum())} kept key(s) have no image in {images_dir}, e.g. {lost}")
    grid_keys = list(grid_keys or [])
    route_dir, spill, grid_dir, staged = work / "route", work / "spill", work / "grid", work / "tars"
    for d in (route_dir, spill, grid_dir, staged):
        d.mkdir(parents=True, exist_ok=True)
    route_jobs = []
    for p, g in route.groupby("part", sort=True):
        path = route_dir / parts[int(p)].name
        keys = g["key"].tolist()
        pq.write_table(pa.table({"key": keys, "shard": g["shard"].to_numpy()}), path)
        mine = set(keys)
        route_jobs.append(RouteJob(str(parts[int(p)]), str(path), str(spill), [k for k in grid_keys if k in mine],
                                   str(grid_dir)))
    del route, located
    indexed = table.set_index("key")
    write_jobs = []
    meta_dir = work / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    for s, chunk in enumerate(plan):
        path = meta_dir / f"{s:05d}.parquet"
        pq.write_table(pa.Table.from_pandas(indexed.loc[chunk].reset_index(), preserve_index=False), path)
        write_jobs.append(WriteJob(s, str(path), str(spill / f"{s:05d}"), str(staged), cfg, score_cols))
    del indexed
    with executor(runner, root=work) as ex:
        ex.map(route_part, route_jobs)
        written = ex.map(write_part_shard, write_jobs)

    # number the tars in plan order: the names one process would have given them
    out_dir.mkdir(parents=True, exist_ok=True)
    infos: list[ShardInfo] = []
    names: list[str] = []
    counts: list[int] = []
    for pieces in written:
        for piece in pieces:
            info = ShardInfo(**piece)
            name = f"{cfg.name_prefix}{len(infos):05d}.tar"
            src, dst = staged / info.name, out_dir / name
            os.replace(src, dst)
            os.replace(src.with_suffix(".parquet"), dst.with_suffix(".parquet"))
            os.replace(staged / f"{src.stem}_stats.json", out_dir / f"{dst.stem}_stats.json")
            infos.append(info.model_copy(update={"name": name}))
            names.append(name)
            counts.append(info.count)
    tar_of = pd.Series(np.repeat(np.asarray(names, dtype=object), counts), index=order["key"].to_numpy())
    grid: dict[str, tuple[bytes, str]] = {}
    for frag in sorted(grid_dir.glob("*.parquet")):
        t = pq.read_table(frag)
        grid.update(zip(t.column("key").to_pylist(), zip(t.column("image").to_pylist(), t.column("ext").to_pylist())))
    shutil.rmtree(work, ignore_errors=True)
    return infos, tar_of, grid

