"""Dedup stage: mark exact and perceptual near-duplicates; nothing is deleted.

Exact duplicates are images whose normalized encoded bytes are identical (same ``sha256`` from
the download stage).  Near-duplicates are images whose 64-bit perceptual hashes (imagehash:
phash by default) lie within a Hamming radius; the pairs come from the exact multi-index-hashing
search in :mod:`imagegen.mih` and are closed transitively into clusters (connected components),
so a long chain of small edits ends up in one cluster; ``min_distance_to_rep`` shows when a
member is further than ``radius`` from its representative.

Keep rule ``largest_original_area``: in each near cluster the representative is the image with
the largest ``original_width * original_height`` in the download ledger (the best source), ties
broken by the smallest key, so the choice is deterministic and independent of file order.

Output columns (one row per image, sorted by key): ``phash`` is the 16-hex-digit hash of the
configured ``hash_type`` (phash unless set otherwise); ``exact_cluster`` / ``near_cluster`` are the
smallest key of the group; ``dup_kind`` is "unique" for representatives (kept), "exact" for rows
byte-identical to their representative, "near" for the other members; ``min_distance_to_rep`` is
the Hamming distance from the row's hash to the representative's (0 for exact copies).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from imagegen import mih
from imagegen.artifacts import write_parquet_atomic
from imagegen.semdedup import SemDedupConfig
from imagegen.executors import StageRunner, map_step, thread_caps, worker_threads
from imagegen.hashing import file_sha256, stable_hash

log = logging.getLogger(__name__)

HashType = Literal["phash", "dhash", "ahash", "whash"]
HASH_FUNCS: dict[str, Callable[..., imagehash.ImageHash]] = {
    "phash": imagehash.phash, "dhash": imagehash.dhash,
    "ahash": imagehash.average_hash, "whash": imagehash.whash,
}
HASH_SIZE = 8  # 8x8 bits = 64: the index works on uint64
CHUNK = 256  # images per worker task: large enough to amortize pickling, small enough to balance

IMAGE_COLUMNS = ["key", "row_id", "image", "sha256"]
LEDGER_COLUMNS = ["key", "status", "original_width", "original_height"]
OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()), ("row_id", pa.int64()), ("sha256", pa.string()), ("phash", pa.string()),
    ("exact_cluster", pa.string()), ("near_cluster", pa.string()), ("cluster_size", pa.int64()),
    ("is_representative", pa.bool_()), ("duplicate_of", pa.string()), ("dup_kind", pa.string()),
    ("min_distance_to_rep", pa.int16()),
])


class DedupConfig(BaseModel):
    """Options of the dedup stage."""

    model_config = ConfigDict(extra="forbid")

    hash_type: HashType = Field("phash", description="imagehash function used for near-duplicates")
    radius: int = Field(4, ge=0, le=mih.MAX_RADIUS,
                        description="Max Hamming distance (of 64 bits) for two images to be near-duplicates; "
                        "0 = identical hashes only")
    processes: int = Field(1, ge=1, le=64, description="Hashing worker processes (capped at the CPU count)")
    keep_rule: Literal["largest_original_area"] = Field(
        "largest_original_area", description="Representative of a cluster: largest original_width*original_height "
        "in the ledger, then smallest key")
    batch_rows: int = Field(1000, ge=1, le=100_000, description="Rows per parquet read batch")
    semantic: SemDedupConfig | None = Field(None, description="SemDeDup over CLIP image embeddings of the "
                                            "perceptual representatives (off by default); marks dup_kind "
                                            "'semantic' (filter reason 'semantic_duplicate')")
    semantic_model: str = Field("world", description="open_clip spec of the embeddings for semantic dedup "
                                "('world': the embedded world's reference CLIP)")
    semantic_batch_size: int = Field(256, ge=1, le=65536, description="Images per CLIP batch (semantic)")
    runner: StageRunner = None


# ---------------------------------------------------------------------------- hashing

def _hash_one(item: bytes | str | Path, hash_type: str, hash_size: int) -> int:
    if isinstance(item, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(item))
    else:
        img = Image.open(item)
    with img:
        bits = HASH_FUNCS[hash_type](img.convert("RGB"), hash_size=hash_size).hash
    # imagehash's hex form reads the flattened bits most significant first; packbits matches it
    return int.from_bytes(np.packbits(bits.reshape(-1)).tobytes(), "big")


def _hash_chunk(args: tuple[list[Any], str, int, int]) -> np.ndarray:
    items, hash_type, hash_size, offset = args
    out = np.empty(len(items), np.uint64)
    for i, item in enumerate(items):
        try:
            out[i] = _hash_one(item, hash_type, hash_size)
        except Exception as exc:  # PIL raises several types for bad data
            where = item if isinstance(item, (str, Path)) else f"{len(item)} bytes"
            raise ValueError(f"image #{offset + i} ({where}) could not be hashed: "
                             f"{type(exc).__name__}: {exc}") from None
    return out


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds (the download stage uses it too); spawn where it is missing
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def compute_hashes(images: Iterable[bytes | str | Path], hash_type: str = "phash", hash_size: int = HASH_SIZE,
                   processes: int = 1, chunk_size: int = CHUNK) -> np.ndarray:
    """64-bit perceptual hashes (uint64, bit order of imagehash's hex string) of encoded images or paths.

    ``images`` may be a generator; it is consumed in the calling process in order, chunk by
    chunk, with at most ``4 * processes`` chunks in flight, so memory stays bounded.
    """
    if hash_type not in HASH_FUNCS:
        raise ValueError(f"hash_type must be one of {sorted(HASH_FUNCS)}, got {hash_type!r}")
    if hash_size != HASH_SIZE:
        raise ValueError(f"hash_size must be {HASH_SIZE} (64-bit hashes for the near-duplicate index), "
                         f"got {hash_size}")
    if not 1 <= processes <= 64:
        raise ValueError(f"processes must be in 1..64, got {processes}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _hash_chunks(_chunks(images, chunk_size), hash_type, hash_size, min(processes, os.cpu_count() or 1))


def _hash_chunks(chunks: Iterator[list[Any]], hash_type: str, hash_size: int, processes: int) -> np.ndarray:
    """The hashes of a stream of chunks, in order (a pool of ``processes`` with at most ``4 * processes``
    chunks in flight)."""
    first = next(chunks, None)
    if first is None:
        return np.empty(0, np.uint64)
    second = next(chunks, None)
    single = processes == 1 or second is None
    head = [first] if second is None else [first, second]
    del first, second  # only ``head`` holds them, and it lets go of each once it is handed on
    parts = []
    offset = 0
    if single:
        for chunk in _drain(head, chunks):
            parts.append(_hash_chunk((chunk, hash_type, hash_size, offset)))
            offset += len(chunk)
            del chunk
        return np.concatenate(parts)
    pending: deque[Any] = deque()
    with _pool_context().Pool(processes) as pool:
        for chunk in _drain(head, chunks):
            pending.append(pool.apply_async(_hash_chunk, ((chunk, hash_type, hash_size, offset),)))
            offset += len(chunk)
            del chunk
            while len(pending) >= 4 * processes:
                parts.append(pending.popleft().get())
        while pending:
            parts.append(pending.popleft().get())
    return np.concatenate(parts)


def _drain(head: list[list[Any]], tail: Iterator[list[Any]]) -> Iterator[list[Any]]:
    while head:
        yield head.pop(0)
    yield from tail


def hash_hex(hashes: np.ndarray) -> list[str]:
    """16-character lowercase hex strings, equal to ``str(imagehash_result)`` for 64-bit hashes."""
    return [f"{int(h):016x}" for h in hashes]


# ---------------------------------------------------------------------------- reading inputs

def _require_columns(schema: pa.Schema, needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {schema.names}")


class Areas:
    """Original area (width * height) per key of the ledger's 'success' rows, as compact columns (an
    Arrow string array of keys and an int64 array), never a Python object per row."""

    def __init__(self, keys: pa.Array, area: np.ndarray) -> None:
        self.keys, self.area = keys, np.asarray(area, np.int64)

    @classmethod
    def from_series(cls, s: pd.Series) -> "Areas":
        return cls(pa.array([str(k) for k in s.index], pa.string()), s.to_numpy().astype(np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: pa.Array) -> np.ndarray:
        """Index of each key in the ledger, -1 where it has none."""
        idx = pc.index_in(keys, value_set=self.keys)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def lookup(self, keys: Iterable[str]) -> np.ndarray:
        pos = self.positions(pa.array(list(keys), pa.string()))
        if (pos < 0).any():
            raise KeyError(f"{int((pos < 0).sum())} key(s) not in the ledger")
        return self.area[pos]


def _read_ledger(ledger_path: Path, batch_rows: int) -> Areas:
    """Original area (width * height) per key, for rows with status 'success'.  ``ledger_path``: one
    parquet file, or a download stage folder whose per-part ledger is read lazily (messages name it)."""
    if Path(ledger_path).is_dir():
        from imagegen.stages.ledger import ledger_dataset, ledger_location

        dset = ledger_dataset(ledger_path)  # raises naming the folder when it holds no ledger
        ledger_path = ledger_location(ledger_path)
        schema = dset.schema
        batches: Iterable[pa.RecordBatch] = dset.to_batches(columns=LEDGER_COLUMNS,
                                                            batch_size=max(batch_rows, 65536))
    elif not Path(ledger_path).is_file():
        raise FileNotFoundError(f"ledger {ledger_path} does not exist")
    else:
        pf = pq.ParquetFile(ledger_path)
        schema = pf.schema_arrow
        batches = pf.iter_batches(batch_size=max(batch_rows, 65536), columns=LEDGER_COLUMNS)
    _require_columns(schema, LEDGER_COLUMNS, f"ledger {ledger_path}")
    keys, widths, heights = [], [], []
    for batch in batches:
        ok = pc.equal(batch.column("status"), "success").fill_null(False)
        b = batch.filter(ok)
        keys.append(pc.cast(b.column("key"), pa.string()))
        widths.append(pc.cast(b.column("original_width"), pa.int64()))
        heights.append(pc.cast(b.column("original_height"), pa.int64()))
    key = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
    w = pa.concat_arrays(widths) if widths else pa.array([], pa.int64())
    h = pa.concat_arrays(heights) if heights else pa.array([], pa.int64())
    bad = pc.or_(pc.or_(pc.is_null(key), pc.is_null(w)), pc.is_null(h))
    if pc.any(bad).as_py():
        raise ValueError(f"ledger {ledger_path}: {pc_sum(bad)} success row(s) lack key or original size "
                         f"(e.g. keys {key.filter(bad)[:5].to_pylist()})")
    if len(key) and pc.count_distinct(key).as_py() != len(key):
        raise ValueError(f"ledger {ledger_path}: duplicate success keys {_duplicated(key)[:5]}")
    return Areas(key, pc.multiply(w, h).to_numpy(zero_copy_only=False).astype(np.int64))


def _duplicated(keys: pa.Array) -> list[str]:
    """Keys that occur more than once, in key order."""
    vc = pc.value_counts(keys)
    rep = vc.field("values").filter(pc.greater(vc.field("counts"), 1))
    return sorted(rep.to_pylist())


def _image_parts(images_dir: Path) -> list[Path]:
    parts = sorted(Path(images_dir).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet files in {images_dir}")
    for part in parts:
        _require_columns(pq.ParquetFile(part).schema_arrow, IMAGE_COLUMNS, f"image part {part}")
    return parts


# ---------------------------------------------------------------------------- the stage

def pc_sum(col: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(col, pa.int64())).as_py() or 0)


def _hash_key(job: tuple[str, str, int]) -> dict[str, Any]:
    part, hash_type, _batch_rows = job  # the read batch size does not change the hashes
    return {"part": file_sha256(part), "hash_type": hash_type}


@map_step("dedup-hash", key=_hash_key)
def hash_part(job: tuple[str, str, int]) -> pa.Table:
    """The map step of the dedup stage: (key, row_id, sha256, hash) of one image part."""
    part, hash_type, batch_rows = job
    keys: list[pa.Array] = []
    row_ids: list[pa.Array] = []
    shas: list[pa.Array] = []
    hashes = []
    pf = pq.ParquetFile(part)
    done = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=IMAGE_COLUMNS):
        _check_batch(batch, Path(part))
        hashes.append(_hash_chunk((batch.column("image").to_pylist(), hash_type, HASH_SIZE, done)))
        done += batch.num_rows
        keys.append(pc.cast(batch.column("key"), pa.string()))
        row_ids.append(pc.cast(batch.column("row_id"), pa.int64()))
        shas.append(pc.cast(batch.column("sha256"), pa.string()))
    h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    return pa.table({"key": _concat(keys, pa.string()), "row_id": _concat(row_ids, pa.int64()),
                     "sha256": _concat(shas, pa.string()), "hash": pa.array(h, pa.uint64())})


def run_dedup(images_dir: Path, ledger_path: Path, cfg: DedupConfig, out_path: Path,
              runner: str | None = None, resolve_model: Callable[[str], str] = lambda s: s) -> dict[str, Any]:
    """Hash every image, group exact and near duplicates, write one marked row per image to ``out_path``.

    With more than one image part and a runner other than ``local:1``, hashing is a map step over
    the parts on the runner (:mod:`imagegen.executors`; ``local`` uses ``cfg.processes`` workers);
    the grouping works on the compact columns only (keys and sha256 as Arrow arrays, the 64-bit
    hashes as numpy; no Python object per row).  Returns counts for the stage card.
    """
    area_by_key = _read_ledger(Path(ledger_path), cfg.batch_rows)
    parts = _image_parts(Path(images_dir))
    spec = runner or "local"
    if len(parts) > 1 and spec != "local:1":
        from imagegen.executors import executor

        with executor(spec, root=Path(out_path).parent, workers=cfg.processes) as ex:
            tables = ex.map(hash_part, [(str(p), cfg.hash_type, cfg.batch_rows) for p in parts])
        t = pa.concat_tables(tables)
        del tables
        return _finish(t.column("key"), t.column("row_id"), t.column("sha256"),
                       t.column("hash").to_numpy().astype(np.uint64), area_by_key, cfg, out_path,
                       parts, spec, resolve_model)

    keys: list[pa.Array] = []
    row_ids: list[pa.Array] = []
    shas: list[pa.Array] = []

    def stream() -> Iterator[list[bytes]]:
        # Runs in this process (consumed lazily): side columns fill as we go, as Arrow arrays; a batch's
        # image bytes are the only Python objects, and only while it is hashed.  Chunks never span two
        # batches: one that held the tail of a batch and the head of the next kept both alive and let the
        # heap grow part after part (measured: +37 MB from 3 to 12 parts of 100-kB images).
        for part in parts:
            pf = pq.ParquetFile(part)
            for batch in pf.iter_batches(batch_size=cfg.batch_rows, columns=IMAGE_COLUMNS):
                _check_batch(batch, part)
                keys.append(pc.cast(batch.column("key"), pa.string()))
                row_ids.append(pc.cast(batch.column("row_id"), pa.int64()))
                shas.append(pc.cast(batch.column("sha256"), pa.string()))
                images = batch.column("image")
                del batch
                for i in range(0, len(images), CHUNK):
                    yield images.slice(i, CHUNK).to_pylist()

    processes = min(cfg.processes, os.cpu_count() or 1)
    with thread_caps(worker_threads(processes)):  # this process's share when it hashes (processes=1)
        hashes = _hash_chunks(stream(), cfg.hash_type, HASH_SIZE, processes)
    return _finish(_concat(keys, pa.string()), _concat(row_ids, pa.int64()), _concat(shas, pa.string()), hashes,
                   area_by_key, cfg, out_path, parts, spec, resolve_model)


def _check_batch(batch: pa.RecordBatch, part: Path) -> None:
    bad = pc.or_(pc.or_(pc.is_null(batch.column("image")), pc.is_null(batch.column("key"))),
                 pc.is_null(batch.column("sha256")))
    if pc.any(bad).as_py():
        j = int(pc.index(bad, True).as_py())
        raise ValueError(f"image part {part}: row {batch.column('row_id')[j].as_py()} (key "
                         f"{batch.column('key')[j].as_py()!r}) has a null key, image or sha256")


def _concat(arrays: list[pa.Array], type_: pa.DataType) -> pa.Array:
    return pa.concat_arrays(arrays) if arrays else pa.array([], type_)


def _as_array(col: Any, type_: pa.DataType) -> pa.Array:
    """An Arrow array of ``type_`` from a list, a numpy array, an Arrow array or chunked array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not isinstance(col, pa.Array):
        col = pa.array(list(col) if not isinstance(col, np.ndarray) else col, type_)
    return col if col.type == type_ else pc.cast(col, type_)


def _embed_key(job: tuple[str, list[str], str, int, str]) -> dict[str, Any]:
    part, keys, spec, batch_size, _out = job
    return {"part": file_sha256(part), "keys": stable_hash(keys, 32), "model": spec, "batch_size": batch_size}


def _embed_outputs(job: tuple[str, list[str], str, int, str]) -> list[str]:
    name, out = Path(job[0]).stem, Path(job[4])
    return [str(out / f"{name}.npy"), str(out / f"{name}.keys.parquet")]


@map_step("dedup-embed", key=_embed_key, outputs=_embed_outputs, model=True)
def embed_part(job: tuple[str, list[str], str, int, str]) -> tuple[str, str]:
    """The semantic map step: CLIP image embeddings of the listed keys of one image part, written
    as a SemDeDup embedding part (``.npy`` + keys); returns its two paths."""
    import multiprocessing

    from imagegen.clip import encode_images, load_clip
    from imagegen.semdedup import write_embedding_part

    part, keys, spec, batch_size, out_dir = job
    if multiprocessing.parent_process() is not None:
        import torch

        torch.set_num_threads(1)
    want = set(keys)
    t = pq.read_table(part, columns=["key", "image"])
    sel = [(k, b) for k, b in zip(t.column("key").to_pylist(), t.column("image").to_pylist()) if k in want]
    del t
    clip = load_clip(spec)
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for _, b in sel]
    emb = encode_images(clip, imgs, batch_size=batch_size) if imgs else np.zeros((0, 1), np.float32)
    ep = write_embedding_part(out_dir, Path(part).stem, [k for k, _ in sel], emb, dtype="float32")
    return str(ep.embeddings), str(ep.keys)


def _semantic(table: pa.Table, parts: list[Path], cfg: DedupConfig, area_by_key: "Areas | pd.Series", work: Path,
              runner: str, resolve_model: Callable[[str], str]) -> tuple[pa.Table, dict[str, Any]]:
    """SemDeDup over the perceptual representatives; their semantic duplicates become dup_kind 'semantic'."""
    from imagegen.executors import executor
    from imagegen.semdedup import EmbeddingPart, semdedup_parts

    assert cfg.semantic is not None
    df = table.to_pandas()
    reps = set(df.loc[df["is_representative"], "key"])
    spec = resolve_model(cfg.semantic_model)
    jobs = []
    for p in parts:
        keys = [k for k in pq.read_table(p, columns=["key"]).column("key").to_pylist() if k in reps]
        if keys:
            jobs.append((str(p), keys, spec, cfg.semantic_batch_size, str(work)))
    if len(jobs) <= 1 or runner == "local:1":
        paths = [embed_part(j) for j in jobs]
    else:
        with executor(runner, root=work, workers=cfg.processes) as ex:
            paths = ex.map(embed_part, jobs)
    eparts = [EmbeddingPart(Path(e), Path(k)) for e, k in paths]
    areas = area_by_key if isinstance(area_by_key, Areas) else Areas.from_series(area_by_key)
    sem, sem_counts = semdedup_parts(eparts, cfg.semantic, priority=areas.lookup)
    sd = sem.to_pandas().set_index("key")
    sem_dup = df["key"].map(lambda k: k in sd.index and not bool(sd.at[k, "is_representative"])).to_numpy(bool)
    dup_of = df["key"].map(lambda k: sd.at[k, "duplicate_of"] if k in sd.index else None)
    df.loc[sem_dup, "is_representative"] = False
    df.loc[sem_dup, "dup_kind"] = "semantic"
    df.loc[sem_dup, "duplicate_of"] = dup_of[sem_dup]
    df["sem_cluster"] = df["key"].map(lambda k: int(sd.at[k, "sem_cluster"]) if k in sd.index else -1).astype("int32")
    df["sem_group"] = df["key"].map(lambda k: sd.at[k, "sem_group"] if k in sd.index else None)
    df["sim_to_rep"] = df["key"].map(lambda k: float(sd.at[k, "sim_to_rep"]) if k in sd.index else float("nan"))
    out = pa.Table.from_pandas(df, preserve_index=False)
    counts = {"semantic_duplicates": int(sem_dup.sum()), "semantic": sem_counts, "semantic_model": cfg.semantic_model}
    return out, counts


def _finish(keys: Any, row_ids: Any, shas: Any, hashes: np.ndarray, area_by_key: "Areas | pd.Series",
            cfg: DedupConfig, out_path: Path, parts: list[Path] | None = None, runner: str = "local",
            resolve_model: Callable[[str], str] = lambda s: s) -> dict[str, Any]:
    table, counts = mark_duplicates(keys, row_ids, shas, hashes, area_by_key, cfg.radius)
    if cfg.semantic is not None and parts:
        table, sem_counts = _semantic(table, parts, cfg, area_by_key, Path(out_path).parent / "_embeddings",
                                      runner, resolve_model)
        counts.update(sem_counts)
        counts["representatives"] = int(pc_sum(table.column("is_representative")))
        counts["marked_duplicates"] = counts["images"] - counts["representatives"]
    write_parquet_atomic(table, Path(out_path))
    counts.update(hash_type=cfg.hash_type, radius=cfg.radius, keep_rule=cfg.keep_rule)
    log.info("dedup: %(images)d images, %(marked_duplicates)d marked duplicates "
             "(%(exact_duplicates)d exact, %(near_duplicates)d near)", counts)
    return counts


def hex_array(hashes: np.ndarray) -> pa.Array:
    """:func:`hash_hex` as an Arrow string array built from one byte buffer (no Python str per row)."""
    h = np.ascontiguousarray(np.asarray(hashes, np.uint64).astype(">u8")).view(np.uint8).reshape(-1, 8)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    chars = np.empty((len(h), 16), np.uint8)
    chars[:, 0::2] = digits[h >> 4]
    chars[:, 1::2] = digits[h & 15]
    offsets = np.arange(0, 16 * len(h) + 1, 16, dtype=np.int32)
    return pa.StringArray.from_buffers(len(h), pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def mark_duplicates(keys: Any, row_ids: Any, shas: Any, hashes: np.ndarray,
                    area_by_key: "Areas | pd.Series", radius: int) -> tuple[pa.Table, dict[str, Any]]:
    """The marking logic of :func:`run_dedup` on in-memory columns (rows come back sorted by key).

    ``keys``, ``row_ids`` and ``shas`` may be lists or Arrow arrays; the work is done on Arrow and numpy
    arrays (memory per row: the key and sha256 bytes, the hash and a few integer columns)."""
    key_a = _as_array(keys, pa.string())
    row_a = _as_array(row_ids, pa.int64())
    sha_a = _as_array(shas, pa.string())
    n = len(key_a)
    if not (len(row_a) == len(sha_a) == len(hashes) == n):
        raise ValueError(f"column lengths differ: keys {n}, row_ids {len(row_a)}, sha256 {len(sha_a)}, "
                         f"hashes {len(hashes)}")
    areas = area_by_key if isinstance(area_by_key, Areas) else Areas.from_series(area_by_key)
    if n and pc.count_distinct(key_a).as_py() != n:
        raise ValueError(f"image keys are not unique: {_duplicated(key_a)[:5]}")
    pos = areas.positions(key_a)
    if (pos < 0).any():
        raise ValueError(f"{int((pos < 0).sum())} image(s) have no 'success' row in the ledger "
                         f"(e.g. keys {key_a.filter(pa.array(pos < 0))[:5].to_pylist()})")
    if len(areas) != n:
        have = np.zeros(len(areas), bool)
        have[pos] = True
        missing = areas.keys.filter(pa.array(~have))[:5].to_pylist()
        raise ValueError(f"ledger has {len(areas)} success rows but images_dir has {n} images; "
                         f"missing images for keys {missing}")
    # Work in key order: "smallest row index" below then means "smallest key".
    order = pc.sort_indices(key_a).to_numpy().astype(np.int64) if n else np.empty(0, np.int64)
    take = pa.array(order)
    key_arr = key_a.take(take)
    row_arr = row_a.take(take).to_numpy(zero_copy_only=False)
    sha_arr = sha_a.take(take)
    hashes = np.asarray(hashes, dtype=np.uint64)[order]
    area = areas.area[pos[order]].astype(np.int64)

    # exact groups: equal sha256, labelled by the smallest key (dictionary codes number the distinct
    # values in order of first appearance, i.e. of their smallest key)
    sha_inv = sha_arr.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
    _, sha_first = np.unique(sha_inv, return_index=True)
    exact_label = sha_first[sha_inv]  # first occurrence = smallest row = smallest key of the group

    result = mih.near_pairs(hashes, radius)
    near_label = mih.clusters_from_near_pairs(result)  # smallest row index of each cluster
    if not np.array_equal(near_label[exact_label], near_label):
        raise AssertionError("an exact group is split across near clusters (equal bytes with unequal hashes?)")
    size = np.bincount(near_label, minlength=n)[near_label]

    # representative: largest original area, then smallest key (= smallest row in key order)
    rank = np.lexsort((np.arange(n), -area, near_label))  # by cluster, area desc, row asc
    first_in_cluster = np.ones(n, bool)
    first_in_cluster[1:] = near_label[rank[1:]] != near_label[rank[:-1]]
    rep_of_cluster = np.empty(n, np.int64)
    rep_of_cluster[near_label[rank[first_in_cluster]]] = rank[first_in_cluster]
    rep = rep_of_cluster[near_label]
    is_rep = rep == np.arange(n)
    exact_to_rep = sha_inv == sha_inv[rep]
    kind_code = np.where(is_rep, 0, np.where(exact_to_rep, 1, 2)).astype(np.int32)
    dist = np.bitwise_count(hashes ^ hashes[rep]).astype(np.int16)

    table = pa.table({
        "key": key_arr, "row_id": row_arr, "sha256": sha_arr,
        "phash": hex_array(hashes), "exact_cluster": key_arr.take(pa.array(exact_label)),
        "near_cluster": key_arr.take(pa.array(near_label)), "cluster_size": size.astype(np.int64),
        "is_representative": is_rep,
        "duplicate_of": pc.if_else(pa.array(is_rep), pa.scalar(None, pa.string()), key_arr.take(pa.array(rep))),
        "dup_kind": pa.array(["unique", "exact", "near"], pa.string()).take(pa.array(kind_code)),
        "min_distance_to_rep": dist,
    }, schema=OUTPUT_SCHEMA)
    exact_sizes = np.bincount(sha_inv)
    near_sizes = np.bincount(near_label, minlength=n)
    counts = {
        "images": n,
        "unique_sha256": int(len(exact_sizes)),
        "exact_groups": int((exact_sizes >= 2).sum()),
        "unique_hashes": int(len(result.unique)),
        "near_pairs": int(len(result.pairs)),
        "near_groups": int((near_sizes >= 2).sum()),
        "representatives": int(is_rep.sum()),
        "marked_duplicates": int((~is_rep).sum()),
        "exact_duplicates": int((kind_code == 1).sum()),
        "near_duplicates": int((kind_code == 2).sum()),
        "max_distance_to_rep": int(dist.max()) if n else 0,
    }
    return table, counts
