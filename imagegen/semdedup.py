"""SemDeDup: semantic near-duplicates over CLIP image embeddings, marked, never deleted.

Method (Abbas, Tirumala, Simig, Ganguli, Morcos 2023, "SemDeDup: Data-efficient learning at
web-scale through semantic deduplication", arXiv 2303.09540): cluster the L2-normalised
embeddings with (spherical) k-means, then within each cluster call two rows duplicates when
their cosine similarity exceeds ``threshold`` (the paper's ``1 - eps``).  Pairs across clusters are
never compared; that is the approximation that makes it scale (the paper: 50k clusters for
LAION-440M), and the reason to size clusters generously.

Two grouping rules:

- ``components`` (default, the rule of the phash dedup stage): duplicate pairs are closed
  transitively into groups; each group keeps one representative.
- ``paper``: the paper's rule; rows are ranked, and a row is dropped when it is a duplicate of any
  better-ranked row of its cluster.  It keeps at least one row of every group (maybe several in a
  chain); ``duplicate_of`` follows better-ranked duplicates to a kept row.

The representative (rank) is chosen by ``keep``: ``farthest_from_centroid`` (the paper keeps the
row least similar to its cluster centroid), ``closest_to_centroid``, or ``priority`` (a caller
column, higher first: e.g. original image area, as the dedup stage does); ties by smallest key.

Determinism.  Results depend only on the (key, embedding) pairs and the config: rows are worked in
key order, the k-means sample is the rows with the smallest keyed hash, initial centroids are drawn
with the config seed.  ``backend`` (``numpy``, or ``faiss`` for the nearest-centroid searches of
k-means) does not change results: each search is done in float32, and rows whose best and
second-best centroid similarities are within ``TIE_TOLERANCE`` are re-decided in float64, as are
pairs within ``TIE_TOLERANCE`` of the threshold, so float32 rounding (BLAS kernels, FAISS) cannot
flip an assignment or a pair (float32 dot-product error on unit vectors of dimension <= 4096 is
below 1e-5).  Stored similarities are rounded to 6 decimals.

Memory: the plain function holds the embeddings; :func:`semdedup_parts` reads per-part ``.npy``
files (memory-mapped) and holds only compact columns (keys, cluster ids), the k-means sample, and
the rows of up to ``max_rows_in_memory`` at a time for the within-cluster step (a single cluster
larger than that is still processed whole: size clusters accordingly).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from imagegen import mih

TIE_TOLERANCE = 1e-4
SIM_DECIMALS = 6
_BLOCK = 4096  # rows per similarity block (a block x K or block x m float32 matrix at a time)

OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()), ("sem_cluster", pa.int32()), ("sem_group", pa.string()),
    ("is_representative", pa.bool_()), ("duplicate_of", pa.string()), ("sim_to_rep", pa.float64()),
    ("sim_to_centroid", pa.float64()), ("max_sim", pa.float64()),
])


class SemDedupConfig(BaseModel):
    """SemDeDup over CLIP image embeddings (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.95, gt=0, le=1, description="Cosine similarity above which two rows of a "
                             "cluster are duplicates (the paper's 1 - eps)")
    n_clusters: int | None = Field(None, ge=1, le=10_000_000, description="k-means clusters; None: "
                                   "ceil(rows / target_cluster_size)")
    target_cluster_size: int = Field(1000, ge=1, le=10_000_000, description="Rows per cluster when n_clusters is None")
    kmeans_iters: int = Field(20, ge=1, le=1000, description="Lloyd iterations (stops early when stable)")
    max_points_per_centroid: int = Field(256, ge=1, le=100_000, description="k-means trains on at most "
                                         "n_clusters * this rows (FAISS's default is 256)")
    seed: int = Field(0, ge=0, description="Sample and initial-centroid seed")
    grouping: Literal["components", "paper"] = "components"
    keep: Literal["farthest_from_centroid", "closest_to_centroid", "priority"] = "farthest_from_centroid"
    backend: Literal["numpy", "faiss"] = Field("numpy", description="Nearest-centroid search; results do not "
                                               "depend on it (see module docstring)")
    max_rows_in_memory: int = Field(200_000, ge=1, description="Rows whose embeddings the streaming variant "
                                    "holds at once in the within-cluster step")


# ---------------------------------------------------------------------------- sources of rows

class _Source:
    """Rows in key order: ``keys`` (sorted), ``gather(idx)`` -> float32 unit rows, ``blocks()``."""

    keys: np.ndarray
    dim: int

    def gather(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def blocks(self, size: int) -> Any:
        for s in range(0, len(self.keys), size):
            idx = np.arange(s, min(s + size, len(self.keys)))
            yield idx, self.gather(idx)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(n == 0):
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1) | (n[:, 0] == 0))[:5]
        raise ValueError(f"embeddings have zero or non-finite rows (e.g. rows {bad.tolist()})")
    return x / n


def _check_keys(keys: Sequence[str]) -> np.ndarray:
    arr = np.asarray(keys, dtype=object).astype(str)
    uniq, counts = np.unique(arr, return_counts=True)
    if len(uniq) != len(arr):
        raise ValueError(f"keys are not unique: {uniq[counts > 1][:5].tolist()}")
    return arr


class _ArraySource(_Source):
    def __init__(self, embeddings: np.ndarray, keys: Sequence[str]) -> None:
        emb = np.asarray(embeddings)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {emb.shape}")
        k = _check_keys(keys)
        if len(k) != len(emb):
            raise ValueError(f"{len(k)} keys for {len(emb)} embeddings")
        order = np.argsort(k, kind="stable")
        self.keys = k[order]
        self.order = order
        self._emb = emb
        self.dim = int(emb.shape[1])

    def gather(self, idx: np.ndarray) -> np.ndarray:
        return _unit(self._emb[self.order[idx]])


@dataclass(frozen=True)
class EmbeddingPart:
    """One part's embeddings on disk: ``embeddings`` (.npy, (n, D) float16/float32, memory-mapped)
    and ``keys`` (parquet with a ``key`` column, same row order)."""

    embeddings: Path
    keys: Path


def write_embedding_part(folder: str | Path, name: str, keys: Sequence[str], embeddings: np.ndarray,
                         dtype: str = "float16") -> EmbeddingPart:
    """Write one part's embeddings (``<name>.npy``) and keys (``<name>.keys.parquet``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or len(emb) != len(keys):
        raise ValueError(f"part {name}: {len(keys)} keys for embeddings of shape {emb.shape}")
    part = EmbeddingPart(folder / f"{name}.npy", folder / f"{name}.keys.parquet")
    np.save(part.embeddings, emb.astype(dtype))
    pq.write_table(pa.table({"key": [str(k) for k in keys]}), part.keys)
    return part


class _PartsSource(_Source):
    def __init__(self, parts: Sequence[EmbeddingPart]) -> None:
        if not parts:
            raise ValueError("semdedup_parts needs at least one part")
        self._mm: list[np.ndarray] = []
        keys, part_of, row_of = [], [], []
        dim = None
        for p, part in enumerate(parts):
            for f in (part.embeddings, part.keys):
                if not Path(f).is_file():
                    raise FileNotFoundError(f"embedding part file {f} does not exist")
            mm = np.load(part.embeddings, mmap_mode="r")
            k = pq.read_table(part.keys, columns=["key"]).column("key").to_pylist()
            if mm.ndim != 2 or len(mm) != len(k):
                raise ValueError(f"embedding part {part.embeddings}: shape {mm.shape} for {len(k)} keys in {part.keys}")
            if dim is not None and mm.shape[1] != dim:
                raise ValueError(f"embedding part {part.embeddings} is {mm.shape[1]}-d, earlier parts {dim}-d")
            dim = int(mm.shape[1])
            self._mm.append(mm)
            keys.extend(k)
            part_of.append(np.full(len(k), p, np.int32))
            row_of.append(np.arange(len(k), dtype=np.int64))
        k = _check_keys(keys)
        order = np.argsort(k, kind="stable")
        self.keys = k[order]
        self._part = np.concatenate(part_of)[order]
        self._row = np.concatenate(row_of)[order]
        self.dim = int(dim or 0)

    def gather(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        parts = self._part[idx]
        for p in np.unique(parts):
            sel = np.flatnonzero(parts == p)
            rows = self._row[idx[sel]]
            srt = np.argsort(rows, kind="stable")  # ascending reads from the memory map
            out[sel[srt]] = self._mm[p][rows[srt]]
        return _unit(out)


# ---------------------------------------------------------------------------- k-means

def _key_rank(keys: np.ndarray, seed: int) -> np.ndarray:
    """A keyed hash per row (uint64): the sample is the rows with the smallest values."""
    salt = f"{seed}:".encode()
    return np.array([int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big")
                     for k in keys], dtype=np.uint64)


class _Searcher:
    """Nearest centroid (max inner product) for float32 rows, exact up to TIE_TOLERANCE re-checks."""

    def __init__(self, centroids: np.ndarray, backend: str) -> None:
        self.c64 = np.asarray(centroids, dtype=np.float64)
        self.c32 = self.c64.astype(np.float32)
        self.index = None
        if backend == "faiss":
            try:
                import faiss
            except ImportError as exc:
                raise ImportError("semdedup backend 'faiss' needs the faiss package (pip install faiss-cpu); "
                                  "backend 'numpy' gives the same results") from exc
            self.index = faiss.IndexFlatIP(self.c32.shape[1])
            self.index.add(np.ascontiguousarray(self.c32))

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(centroid index, similarity in float64) per row."""
        k = len(self.c32)
        if k == 1:
            return np.zeros(len(x), np.int64), x.astype(np.float64) @ self.c64[0]
        if self.index is not None:
            sims, idx = self.index.search(np.ascontiguousarray(x, dtype=np.float32), 2)
            best, second, arg = sims[:, 0], sims[:, 1], idx[:, 0].astype(np.int64)
        else:
            s = x @ self.c32.T
            top2 = np.argpartition(-s, 1, axis=1)[:, :2]
            v = np.take_along_axis(s, top2, axis=1)
            swap = v[:, 1] > v[:, 0]
            arg = np.where(swap, top2[:, 1], top2[:, 0]).astype(np.int64)
            best, second = np.maximum(v[:, 0], v[:, 1]), np.minimum(v[:, 0], v[:, 1])
        close = np.flatnonzero(best - second < TIE_TOLERANCE)
        if len(close):  # re-decide near ties exactly (float64; equal values -> lowest index)
            s64 = x[close].astype(np.float64) @ self.c64.T
            arg[close] = np.argmax(s64, axis=1)
        sim = np.einsum("ij,ij->i", x.astype(np.float64), self.c64[arg])
        return arg, sim


def _kmeans(sample: np.ndarray, k: int, iters: int, seed: int, backend: str) -> np.ndarray:
    """Spherical k-means (Lloyd) on unit rows; returns float64 unit centroids (k, D)."""
    rng = np.random.default_rng(seed)
    cent = sample[np.sort(rng.choice(len(sample), size=k, replace=False))].astype(np.float64)
    assign = None
    for _ in range(iters):
        search = _Searcher(cent, backend)
        new = np.empty(len(sample), np.int64)
        sim = np.empty(len(sample), np.float64)
        for s in range(0, len(sample), _BLOCK):
            new[s:s + _BLOCK], sim[s:s + _BLOCK] = search.nearest(sample[s:s + _BLOCK])
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        counts = np.bincount(assign, minlength=k)
        order = np.argsort(assign, kind="stable")
        present = np.flatnonzero(counts)
        sums = np.zeros((k, sample.shape[1]), np.float64)
        starts = np.concatenate(([0], np.cumsum(counts[present])[:-1]))
        sums[present] = np.add.reduceat(sample[order].astype(np.float64), starts, axis=0)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # re-seed empty clusters at the worst-served sample rows, deterministically
            worst = np.argsort(sim, kind="stable")[: len(empty)]
            sums[empty] = sample[worst].astype(np.float64)
            counts[empty] = 1
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        cent = sums / np.maximum(norms, 1e-300)
    return cent


# ---------------------------------------------------------------------------- within clusters

def _pairs_in_cluster(emb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, sim) with i < j and cos > threshold, near-threshold pairs re-decided in float64;
    and each row's highest similarity to another row (max_sim)."""
    m = len(emb)
    ii, jj, ss = [], [], []
    max_sim = np.full(m, -np.inf)
    for s in range(0, m, _BLOCK):
        blk = emb[s:s + _BLOCK] @ emb.T  # (b, m)
        rows = np.arange(s, min(s + _BLOCK, m))
        blk[np.arange(len(rows)), rows] = -np.inf  # not itself
        max_sim[rows] = blk.max(axis=1)
        i, j = np.nonzero(blk > threshold - TIE_TOLERANCE)
        i = i + s
        keep = j > i
        i, j = i[keep], j[keep]
        sim = blk[i - s, j].astype(np.float64)
        near = np.abs(sim - threshold) < TIE_TOLERANCE
        if near.any():
            sim[near] = np.einsum("ij,ij->i", emb[i[near]].astype(np.float64), emb[j[near]].astype(np.float64))
        ok = sim > threshold
        ii.append(i[ok])
        jj.append(j[ok])
        ss.append(sim[ok])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.empty(0, dt))
    return cat(ii, np.int64), cat(jj, np.int64), cat(ss, np.float64), max_sim


def _dedup_cluster(emb: np.ndarray, rank: np.ndarray, cfg: SemDedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows of one cluster (``rank``: 0 = most preferred): (representative row per row,
    its similarity to it, max_sim)."""
    m = len(emb)
    i, j, sim, max_sim = _pairs_in_cluster(emb, cfg.threshold)
    rep = np.arange(m)
    if len(i) == 0:
        return rep, np.ones(m), max_sim
    if cfg.grouping == "components":
        label = mih.clusters(m, np.stack([i, j], axis=1))
        # best-ranked member of each component represents it
        order = np.lexsort((rank, label))
        first = np.ones(m, bool)
        first[1:] = label[order[1:]] != label[order[:-1]]
        rep_of = np.empty(m, np.int64)
        rep_of[label[order[first]]] = order[first]
        rep = rep_of[label]
    else:  # paper: a row is dropped when a better-ranked row is its duplicate
        a = np.where(rank[i] < rank[j], i, j)  # better-ranked end
        b = np.where(rank[i] < rank[j], j, i)
        parent = np.arange(m)
        order = np.lexsort((rank[a], b))  # per dropped row b: its best-ranked duplicate first
        a, b = a[order], b[order]
        first = np.ones(len(b), bool)
        first[1:] = b[1:] != b[:-1]
        parent[b[first]] = a[first]
        # follow better-ranked duplicates to a kept row (ranks strictly fall, so this ends)
        rep = parent.copy()
        for _ in range(m):
            nxt = parent[rep]
            if np.array_equal(nxt, rep):
                break
            rep = nxt
    sim_rep = np.einsum("ij,ij->i", emb.astype(np.float64), emb[rep].astype(np.float64))
    sim_rep[rep == np.arange(m)] = 1.0
    return rep, sim_rep, max_sim


# ---------------------------------------------------------------------------- the drivers

def _run(src: _Source, cfg: SemDedupConfig, priority: np.ndarray | None) -> tuple[pa.Table, dict[str, Any]]:
    n = len(src.keys)
    if cfg.keep == "priority" and priority is None:
        raise ValueError("semdedup keep='priority' needs a priority column (higher is kept first)")
    if n == 0:
        return pa.table({f.name: pa.array([], f.type) for f in OUTPUT_SCHEMA}, schema=OUTPUT_SCHEMA), {"images": 0}
    k = min(n, cfg.n_clusters or max(1, math.ceil(n / cfg.target_cluster_size)))
    s = min(n, k * cfg.max_points_per_centroid)
    sample_idx = np.sort(np.argsort(_key_rank(src.keys, cfg.seed), kind="stable")[:s])
    cent = _kmeans(src.gather(sample_idx), k, cfg.kmeans_iters, cfg.seed, cfg.backend)

    search = _Searcher(cent, cfg.backend)
    cluster = np.empty(n, np.int64)
    sim_c = np.empty(n, np.float64)
    for idx, x in src.blocks(_BLOCK * 4):
        cluster[idx], sim_c[idx] = search.nearest(x)

    if cfg.keep == "priority":
        pr = np.asarray(priority, dtype=np.float64)
        if pr.shape != (n,):
            raise ValueError(f"priority has shape {pr.shape}, expected ({n},)")
        pref = -pr
    elif cfg.keep == "farthest_from_centroid":
        pref = np.round(sim_c, SIM_DECIMALS)
    else:
        pref = -np.round(sim_c, SIM_DECIMALS)
    rep = np.arange(n)
    sim_rep = np.ones(n)
    max_sim = np.full(n, np.nan)
    by_cluster = np.argsort(cluster, kind="stable")  # rows of a cluster in key order
    sizes = np.bincount(cluster, minlength=k)
    starts = np.concatenate(([0], np.cumsum(sizes)))
    c = 0
    while c < k:  # clusters in groups of at most max_rows_in_memory rows (at least one cluster)
        c1 = c + 1
        while c1 < k and starts[c1 + 1] - starts[c] <= cfg.max_rows_in_memory:
            c1 += 1
        rows = by_cluster[starts[c]:starts[c1]]
        emb = src.gather(rows)
        for cc in range(c, c1):
            lo, hi = starts[cc] - starts[c], starts[cc + 1] - starts[c]
            if hi - lo < 2:
                continue
            members = rows[lo:hi]
            # rank: preference, then key (members are in key order, so position breaks ties)
            rank = np.empty(hi - lo, np.int64)
            rank[np.lexsort((np.arange(hi - lo), pref[members]))] = np.arange(hi - lo)
            r, sr, ms = _dedup_cluster(emb[lo:hi], rank, cfg)
            rep[members] = members[r]
            sim_rep[members] = sr
            max_sim[members] = ms
        c = c1
    is_rep = rep == np.arange(n)
    keys = src.keys
    table = pa.table({
        "key": keys.tolist(), "sem_cluster": cluster.astype(np.int32), "sem_group": keys[rep].tolist(),
        "is_representative": is_rep,
        "duplicate_of": [None if r else kk for r, kk in zip(is_rep, keys[rep].tolist())],
        "sim_to_rep": np.round(sim_rep, SIM_DECIMALS), "sim_to_centroid": np.round(sim_c, SIM_DECIMALS),
        "max_sim": np.round(max_sim, SIM_DECIMALS),
    }, schema=OUTPUT_SCHEMA)
    groups = np.bincount(rep, minlength=n)
    counts = {"images": n, "clusters": int(k), "kmeans_sample": int(s), "largest_cluster": int(sizes.max()),
              "semantic_groups": int((groups >= 2).sum()), "representatives": int(is_rep.sum()),
              "marked_duplicates": int((~is_rep).sum()), "threshold": cfg.threshold, "grouping": cfg.grouping,
              "keep": cfg.keep}
    return table, counts


def semdedup(embeddings: np.ndarray, keys: Sequence[str], cfg: SemDedupConfig | None = None,
             priority: np.ndarray | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """SemDeDup over in-memory (N, D) embeddings; one output row per key, sorted by key.

    ``priority`` (same order as ``keys``) is used with ``keep='priority'``.  Returns (table with
    :data:`OUTPUT_SCHEMA`, counts)."""
    cfg = cfg or SemDedupConfig()
    src = _ArraySource(embeddings, keys)
    pr = None if priority is None else np.asarray(priority, dtype=np.float64)[src.order]
    return _run(src, cfg, pr)


def semdedup_parts(parts: Sequence[EmbeddingPart], cfg: SemDedupConfig | None = None,
                   priority: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """SemDeDup over per-part embedding files (see :func:`write_embedding_part`), memory-mapped.

    ``priority``: a function from the sorted key array to a priority per key (e.g. original area
    looked up in the ledger).  Same result as :func:`semdedup` on the concatenated rows."""
    cfg = cfg or SemDedupConfig()
    src = _PartsSource(parts)
    pr = None if priority is None else np.asarray(priority(src.keys), dtype=np.float64)
    return _run(src, cfg, pr)
