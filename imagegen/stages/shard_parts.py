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

Each task's output is cached: the work folder is named by the shard stage's id
(``<root>/parts/shard/<id>``, so its content is fixed by the stage's inputs, parameters and code),
and a task that finishes writes a marker (``route/<part>.done.json``, ``tars/<shard>.done.json``)
listing its files and result.  A task whose marker and files are all there returns the marker's
result without reading an image, so a shard stage killed midway reruns only the tasks that had not
finished; under Prefect the same identity is the tasks' cache key (``map_step(key=...)``) and the
marker's files their ``outputs``.  The work folder is removed once the dataset is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from imagegen.artifacts import exclusive, write_json_atomic, write_parquet_atomic
from imagegen.executors import executor, map_step
from imagegen.stages.shard import ShardConfig, ShardInfo, plan_shards, write_planned_shard

# the metadata each sample carries (its .json member and its row in the shard's parquet), in this order
LEDGER_META = ("row_id", "url")
CAPTION_META = ("original_caption", "generated_caption", "caption_source", "captioner", "captioner_model")
SIZE_META = ("original_width", "original_height", "sha256", "source_sha256")
DEDUP_META = ("phash", "near_cluster")
log = logging.getLogger(__name__)
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

# ---------------------------------------------------------------------------- per-task markers

def _done_files(done: str) -> list[str]:
    """The marker ``done`` and every file it lists (a task's outputs; the marker alone while it is missing)."""
    try:
        listed = json.loads(Path(done).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [done]
    return [done, *listed]


def _finished(done: str) -> dict[str, Any] | None:
    """The marker's content when the task finished and its files are all still there, else None."""
    try:
        marker = json.loads(Path(done).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not all(Path(f).is_file() for f in marker.get("files", ())):
        return None
    return marker


def _digest(*columns: Any) -> str:
    """sha256 of compact columns (keys, shard numbers) that a task's output depends on."""
    h = hashlib.sha256()
    for col in columns:
        h.update(json.dumps(list(map(str, col))).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


@dataclass
class RouteJob:
    """One download part: send each of its kept images to its planned shard's fragment."""
    part: str          # images/part-NNNNN.parquet
    route: str         # parquet of (key, shard) for this part's kept keys
    spill: str         # folder of fragments: <spill>/<shard>/<part name>
    grid: list[str]    # keys whose images the dataset's sample grid shows (<= 16)
    grid_out: str
    done: str = ""     # the task's marker (in the work folder named by the stage id)
    digest: str = ""   # the part's route (keys, shards) and grid keys


def _route_key(job: RouteJob) -> dict[str, Any]:
    return {"done": job.done, "part": Path(job.part).name, "route": job.digest}


@map_step("shard-route", key=_route_key, outputs=lambda job: _done_files(job.done))
def route_part(job: RouteJob) -> dict[str, Any]:
    """Map step: one download part's kept images into per-shard fragments (atomic files).

    Returns ``{"count": images routed, "reused": whether a finished run's files were used}``."""
    if job.done and (marker := _finished(job.done)) is not None:
        return {"count": int(marker["count"]), "reused": True}
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
    files = []
    for s, items in rows.items():
        n += len(items)
        files.append(Path(job.spill) / f"{s:05d}" / name)
        write_parquet_atomic(_table(items), files[-1])
    if grid:
        files.append(Path(job.grid_out) / name)
        write_parquet_atomic(_table(grid), files[-1])
    if n != len(shard_of):
        raise ValueError(f"{job.part}: {len(shard_of) - n} of its kept keys are not in the part")
    if job.done:
        write_json_atomic(Path(job.done), {"count": n, "files": sorted(map(str, files)), "digest": job.digest})
    return {"count": n, "reused": False}


@dataclass
class WriteJob:
    """One planned shard: its keys' metadata rows (in plan order) and the folder of its fragments."""
    index: int
    meta: str          # parquet: key, caption, metadata columns, in plan order
    spill: str         # folder holding this shard's fragments (one per download part)
    out: str           # where the tars go under provisional names
    cfg: ShardConfig
    score_cols: list[str]
    done: str = ""     # the task's marker (in the work folder named by the stage id)
    digest: str = ""   # the shard's keys in plan order


def _write_key(job: WriteJob) -> dict[str, Any]:
    return {"done": job.done, "index": job.index, "keys": job.digest, "cfg": job.cfg.model_dump(mode="json"),
            "scores": job.score_cols}


def _tar_files(out: Path, name: str) -> list[Path]:
    """A tar and the two files written with it (its parquet and stats)."""
    tar = out / name
    return [tar, tar.with_suffix(".parquet"), out / f"{tar.stem}_stats.json"]


@map_step("shard-write", key=_write_key, outputs=lambda job: _done_files(job.done))
def write_part_shard(job: WriteJob) -> dict[str, Any]:
    """Map step: write one planned shard (one tar, or several under ``max_shard_bytes``).

    Returns ``{"infos": the tars' infos under their provisional names <shard>-<j>.tar, "reused": ...}``."""
    if job.done and (marker := _finished(job.done)) is not None:
        return {"infos": marker["infos"], "reused": True}
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
    infos = [i.model_dump() for i in write_planned_shard(keys, get_sample, out, job.cfg,
                                                          lambda j: f"{job.index:05d}-{j:05d}.tar",
                                                          f"plan shard {job.index}")]
    if job.done:
        files = [str(f) for i in infos for f in _tar_files(out, i["name"])]
        write_json_atomic(Path(job.done), {"infos": infos, "files": files, "digest": job.digest})
    return {"infos": infos, "reused": False}


def _place(src: Path, dst: Path) -> None:
    """Put a finished file of the work folder into the dataset: a hard link (the work folder keeps its
    copy until the dataset is complete, so a run killed here still finds every task's output), or a
    copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _table(items: list[tuple[str, bytes, str]]) -> pa.Table:
    return pa.table({"key": [r[0] for r in items], "image": [r[1] for r in items], "ext": [r[2] for r in items]},
                    schema=_SPILL_SCHEMA)


# ---------------------------------------------------------------------------- the stage's driver

def write_dataset_shards(images_dir: Path, table: pd.DataFrame, score_cols: list[str], cfg: ShardConfig,
                         out_dir: Path, work: Path, runner: str = "local", grid_keys: list[str] | None = None
                         ) -> tuple[list[ShardInfo], pd.Series, dict[str, tuple[bytes, str]], dict[str, Any]]:
    """Shuffle ``table``'s keys (from :func:`metadata_table`) into planned shards, write them on
    ``runner`` and number the tars in plan order into ``out_dir``.

    ``work`` holds the tasks' outputs until the tars are in ``out_dir``; name it by the content the
    shards depend on (the shard stage uses ``<root>/parts/shard/<stage id>``) and a rerun after a crash
    reuses every task that had finished (see the module doc).  Runs of one ``work`` folder take turns
    (a lock next to it).

    Returns (the tars' infos, each key's tar name (a Series indexed by key), the grid keys' images,
    the tasks: ``{"route": {"run": n, "reused": n}, "write": {...}}``)."""
    work = Path(work)
    with exclusive(work.with_name(work.name + ".lock")):
        return _write_dataset_shards(images_dir, table, score_cols, cfg, out_dir, work, runner, grid_keys)


def _write_dataset_shards(images_dir: Path, table: pd.DataFrame, score_cols: list[str], cfg: ShardConfig,
                          out_dir: Path, work: Path, runner: str, grid_keys: list[str] | None
                          ) -> tuple[list[ShardInfo], pd.Series, dict[str, tuple[bytes, str]], dict[str, Any]]:
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
        name = parts[int(p)].name
        path = route_dir / name
        keys = g["key"].tolist()
        write_parquet_atomic(pa.table({"key": keys, "shard": g["shard"].to_numpy()}), path)
        mine = set(keys)
        grid = [k for k in grid_keys if k in mine]
        route_jobs.append(RouteJob(str(parts[int(p)]), str(path), str(spill), grid, str(grid_dir),
                                   done=str(route_dir / f"{Path(name).stem}.done.json"),
                                   digest=_digest(keys, g["shard"].tolist(), grid)))
    del route, located
    indexed = table.set_index("key")
    write_jobs = []
    meta_dir = work / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    for s, chunk in enumerate(plan):
        path = meta_dir / f"{s:05d}.parquet"
        write_parquet_atomic(pa.Table.from_pandas(indexed.loc[chunk].reset_index(), preserve_index=False), path)
        write_jobs.append(WriteJob(s, str(path), str(spill / f"{s:05d}"), str(staged), cfg, score_cols,
                                   done=str(staged / f"{s:05d}.done.json"), digest=_digest(chunk)))
    del indexed
    with executor(runner, root=work) as ex:
        routed = ex.map(route_part, route_jobs)
        written = ex.map(write_part_shard, write_jobs)
    tasks = {what: {"run": sum(not r["reused"] for r in res), "reused": sum(bool(r["reused"]) for r in res)}
             for what, res in (("route", routed), ("write", written))}
    if tasks["route"]["reused"] or tasks["write"]["reused"]:
        log.info("shard: reused the output of %d of %d route and %d of %d write tasks (in %s)",
                 tasks["route"]["reused"], len(routed), tasks["write"]["reused"], len(written), work)

    # number the tars in plan order: the names one process would have given them
    out_dir.mkdir(parents=True, exist_ok=True)
    infos: list[ShardInfo] = []
    names: list[str] = []
    counts: list[int] = []
    for res in written:
        for piece in res["infos"]:
            info = ShardInfo(**piece)
            name = f"{cfg.name_prefix}{len(infos):05d}.tar"
            for src, dst in zip(_tar_files(staged, info.name), _tar_files(out_dir, name)):
                _place(src, dst)
            infos.append(info.model_copy(update={"name": name}))
            names.append(name)
            counts.append(info.count)
    tar_of = pd.Series(np.repeat(np.asarray(names, dtype=object), counts), index=order["key"].to_numpy())
    grid: dict[str, tuple[bytes, str]] = {}
    for frag in sorted(grid_dir.glob("*.parquet")):
        t = pq.read_table(frag)
        grid.update(zip(t.column("key").to_pylist(), zip(t.column("image").to_pylist(), t.column("ext").to_pylist())))
    shutil.rmtree(work, ignore_errors=True)
    return infos, tar_of, grid, tasks
