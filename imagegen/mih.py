"""Exact Hamming-radius search over 64-bit hashes (multi-index hashing), plus clustering.

Why not brute force: all-pairs XOR/popcount is O(N^2) (1M hashes = 5e11 comparisons).  Why not
a BK-tree or an approximate index: we want *exactly* the pairs brute force would find, fast.

Method (Manku, Jain, Das Sarma 2007, "Detecting near-duplicates for web crawling"; Norouzi,
Punjani, Fleet 2012, "Fast search in Hamming space with multi-index hashing"): split the 64 bits
into ``m = k + t`` contiguous blocks.  Two hashes within distance ``k`` differ in at most ``k``
blocks, so (pigeonhole) they agree exactly on at least ``t`` blocks.  For every choice of ``t``
blocks (``C(m, t)`` tables) we sort the hashes by those blocks concatenated and pair up hashes
with equal keys; every candidate is verified with a popcount of the XOR.  A pair that agrees on
several ``t``-subsets is kept only by the table of the *first* ``t`` agreeing blocks, so no pair is
emitted twice and no global de-duplication pass is needed.

Identical hashes are grouped first (``np.unique``): all the blank / solid-colour images of a crawl
share one phash, and as one node they cost nothing instead of an O(n^2) pile of pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

BITS = 64
MAX_RADIUS = 16


@dataclass(frozen=True)
class NearPairs:
    """Result of :func:`near_pairs`; pairs are over *unique* hashes, see :func:`expand_pairs`."""

    unique: np.ndarray  # uint64[U], sorted
    inverse: np.ndarray  # int64[N]: hashes[i] == unique[inverse[i]]
    pairs: np.ndarray  # int64[P, 2], indices into unique, i < j, sorted lexicographically
    distances: np.ndarray  # uint8[P]: Hamming distance of each pair (1..radius)
    radius: int
    blocks: int = 0  # m (0 when no table was needed)
    t: int = 0  # blocks that must agree per table
    tables: int = 0  # C(m, t)


# ---------------------------------------------------------------------------- validation

def _check_hashes(hashes: np.ndarray, name: str = "hashes") -> np.ndarray:
    arr = np.asarray(hashes)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of uint64, got shape {arr.shape}")
    if arr.dtype != np.uint64:
        if arr.dtype.kind in "iu" and arr.size and (arr.min() < 0):
            raise ValueError(f"{name} must be uint64; got {arr.dtype} with negative values")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must be uint64, got dtype {arr.dtype}")
        arr = arr.astype(np.uint64)
    return arr


def _check_radius(radius: int) -> int:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
        raise ValueError(f"radius must be an integer in 0..{MAX_RADIUS}, got {radius!r}")
    if not 0 <= int(radius) <= MAX_RADIUS:
        raise ValueError(f"radius must be in 0..{MAX_RADIUS}, got {radius}")
    return int(radius)


# ---------------------------------------------------------------------------- block layout

def block_layout(m: int) -> list[tuple[int, int]]:
    """``m`` contiguous blocks as (shift, width), most significant first; widths differ by <= 1."""
    if not 1 <= m <= BITS:
        raise ValueError(f"block count must be in 1..{BITS}, got {m}")
    q, r = divmod(BITS, m)
    widths = [q + 1] * r + [q] * (m - r)
    out, hi = [], BITS
    for w in widths:
        hi -= w
        out.append((hi, w))
    return out


def _min_key_bits(m: int, t: int) -> int:
    """Width of the narrowest key among the C(m, t) tables (the t narrowest blocks)."""
    q, r = divmod(BITS, m)
    return t * q + max(0, t - (m - r))


def choose_t(n_unique: int, radius: int, max_tables: int = 256) -> int:
    """Blocks that must agree per table.

    Rule from the brief: the smallest ``t`` whose narrowest key has >= log2(U) + 1 bits, so a
    table holds at most ~U/4 random colliding pairs.  If that needs more than ``max_tables``
    tables (large radius), fall back to the ``t`` with the least estimated work
    ``C(m, t) * (U + U^2 / 2^(bits+1))`` (one sort pass plus expected random collisions).
    """
    need = math.log2(max(n_unique, 2)) + 1
    feasible = []
    for t in range(1, BITS - radius + 1):
        m = radius + t
        tables = math.comb(m, t)
        if tables > max_tables:
            break
        feasible.append(t)
        if _min_key_bits(m, t) >= need:
            return t
    if not feasible:
        return 1

    def cost(t: int) -> float:
        m = radius + t
        bits = _min_key_bits(m, t)
        return math.comb(m, t) * (n_unique + n_unique ** 2 / 2.0 ** (bits + 1))

    return min(feasible, key=cost)


# ---------------------------------------------------------------------------- the search

def near_pairs(hashes: np.ndarray, radius: int, *, t: int | None = None, bucket_cap: int = 256,
               max_tables: int = 256) -> NearPairs:
    """All pairs of distinct hashes within Hamming distance ``radius`` (exact).

    ``t`` overrides :func:`choose_t`; ``bucket_cap``: buckets with more hashes than this are
    searched by blockwise brute force instead of the offset loop (still exact), so a skewed
    distribution (many near-blank phashes sharing a key) cannot make the loop run thousands of
    rounds.
    """
    arr = _check_hashes(hashes)
    k = _check_radius(radius)
    if bucket_cap < 2:
        raise ValueError(f"bucket_cap must be >= 2, got {bucket_cap}")
    unique, inverse = np.unique(arr, return_inverse=True)
    inverse = inverse.astype(np.int64).reshape(-1)
    n_u = len(unique)
    empty = NearPairs(unique, inverse, np.empty((0, 2), np.int64), np.empty(0, np.uint8), k)
    if k == 0 or n_u < 2:
        return empty
    if t is None:
        t = choose_t(n_u, k, max_tables)
    if not 1 <= t <= BITS - k:
        raise ValueError(f"t must be in 1..{BITS - k} for radius {k}, got {t}")
    m = k + t
    layout = block_layout(m)
    idx_bits = max(1, (n_u - 1).bit_length())
    codes: list[np.ndarray] = []
    dists: list[np.ndarray] = []
    n_tables = 0
    for table in combinations(range(m), t):
        n_tables += 1
        a, b = _table_candidates(unique, layout, table, idx_bits, bucket_cap, k)
        if len(a) == 0:
            continue
        x = unique[a] ^ unique[b]
        d = np.bitwise_count(x)
        ok = d <= k
        a, b, x, d = a[ok], b[ok], x[ok], d[ok]
        keep = _first_agreeing_table(x, layout, table)
        a, b, d = a[keep], b[keep], d[keep]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        codes.append(lo * n_u + hi)
        dists.append(d.astype(np.uint8))
    if not codes:
        return NearPairs(unique, inverse, empty.pairs, empty.distances, k, m, t, n_tables)
    code = np.concatenate(codes)
    dist = np.concatenate(dists)
    order = np.argsort(code, kind="stable")
    code, dist = code[order], dist[order]
    pairs = np.stack([code // n_u, code % n_u], axis=1).astype(np.int64)
    return NearPairs(unique, inverse, pairs, dist, k, m, t, n_tables)


def _table_key(unique: np.ndarray, layout: list[tuple[int, int]], table: tuple[int, ...]) -> tuple[np.ndarray, int]:
    key = np.zeros(len(unique), np.uint64)
    bits = 0
    for blk in table:
        shift, width = layout[blk]
        key <<= np.uint64(width)
        key |= (unique >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        bits += width
    return key, bits


def _table_candidates(unique: np.ndarray, layout: list[tuple[int, int]], table: tuple[int, ...],
                      idx_bits: int, bucket_cap: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (into ``unique``) whose keys for ``table`` are equal (unverified)."""
    key, key_bits = _table_key(unique, layout, table)
    n = len(unique)
    if key_bits + idx_bits <= BITS:
        # One sort of (key, index) packed in a uint64 is ~2x faster than argsort of the key.
        packed = np.sort((key << np.uint64(idx_bits)) | np.arange(n, dtype=np.uint64))
        skey = packed >> np.uint64(idx_bits)
        sidx = (packed & np.uint64((1 << idx_bits) - 1)).astype(np.int64)
    else:
        order = np.argsort(key, kind="stable")
        skey, sidx = key[order], order.astype(np.int64)
    same = skey[1:] == skey[:-1]
    if not same.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    sizes = np.diff(np.append(starts, n))
    big = sizes > bucket_cap
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    if big.any():
        in_big = np.repeat(big, sizes)
        same &= ~in_big[:-1]
        for s, z in zip(starts[big], sizes[big]):
            a, b = _bucket_brute_force(unique, sidx[s:s + z], radius)
            out_a.append(a)
            out_b.append(b)
    # Offset loop: in a sorted array, key[i] == key[i+d] implies equality at every offset < d,
    # so the active set only shrinks; it runs (largest small bucket - 1) rounds.
    active = np.flatnonzero(same)
    d = 1
    while len(active):
        out_a.append(sidx[active])
        out_b.append(sidx[active + d])
        d += 1
        active = active[active + d < n]
        active = active[skey[active] == skey[active + d]]
    return np.concatenate(out_a), np.concatenate(out_b)


def _bucket_brute_force(unique: np.ndarray, members: np.ndarray, radius: int,
                        block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """All pairs within ``radius`` inside one oversized bucket, in row blocks of bounded memory."""
    vals = unique[members]
    z = len(vals)
    rows = max(1, block // z)
    out_a, out_b = [], []
    for r0 in range(0, z, rows):
        r1 = min(z, r0 + rows)
        d = np.bitwise_count(vals[r0:r1, None] ^ vals[None, r0:])  # columns r0.. (upper triangle)
        i, j = np.nonzero(d <= radius)
        j = j + r0
        keep = j > i + r0
        out_a.append(members[i[keep] + r0])
        out_b.append(members[j[keep]])
    return np.concatenate(out_a), np.concatenate(out_b)


def _first_agreeing_table(x: np.ndarray, layout: list[tuple[int, int]], table: tuple[int, ...]) -> np.ndarray:
    """True where ``table`` is the lexicographically first t-subset of blocks on which the pair agrees.

    The first such subset (in ``itertools.combinations`` order) is the first t agreeing blocks,
    so it suffices that no block before ``max(table)`` outside the table agrees.
    """
    keep = np.ones(len(x), bool)
    chosen = set(table)
    for blk in range(max(table)):
        if blk in chosen:
            continue
        shift, width = layout[blk]
        keep &= ((x >> np.uint64(shift)) & np.uint64((1 << width) - 1)) != 0
    return keep


# ---------------------------------------------------------------------------- reference + expansion

def brute_force_pairs(hashes: np.ndarray, radius: int, block: int = 1 << 22) -> np.ndarray:
    """All pairs (i < j) of rows within ``radius``, sorted; O(N^2) numpy in bounded-memory blocks."""
    arr = _check_hashes(hashes)
    k = _check_radius(radius)
    n = len(arr)
    rows = max(1, block // max(n, 1))
    out = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        d = np.bitwise_count(arr[r0:r1, None] ^ arr[None, r0:])
        i, j = np.nonzero(d <= k)
        i = i + r0
        j = j + r0
        keep = j > i
        out.append(np.stack([i[keep], j[keep]], axis=1))
    if not out:
        return np.empty((0, 2), np.int64)
    return np.concatenate(out).astype(np.int64)  # row blocks in order, each row-major: sorted


def _groups(inverse: np.ndarray, n_unique: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by unique hash: (rows sorted by group, group start, group size)."""
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    sizes = np.bincount(inverse, minlength=n_unique).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return order, starts, sizes


def expand_pairs(result: NearPairs) -> np.ndarray:
    """Pairs over original rows (i < j, sorted), identical-hash pairs included.

    Output is the size of the full O(n^2)-prone pair set: meant for small-N comparison with
    :func:`brute_force_pairs`, not for production data with large blank piles.
    """
    n_u = len(result.unique)
    order, starts, sizes = _groups(result.inverse, n_u)
    same = np.flatnonzero(sizes >= 2)
    ua = np.concatenate([same, result.pairs[:, 0]]).astype(np.int64)
    ub = np.concatenate([same, result.pairs[:, 1]]).astype(np.int64)
    ca, cb = sizes[ua], sizes[ub]
    counts = ca * cb
    total = int(counts.sum())
    if total == 0:
        return np.empty((0, 2), np.int64)
    pid = np.repeat(np.arange(len(ua)), counts)
    r = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    ai, bi = r // cb[pid], r % cb[pid]
    rows_a = order[starts[ua[pid]] + ai]
    rows_b = order[starts[ub[pid]] + bi]
    i, j = np.minimum(rows_a, rows_b), np.maximum(rows_a, rows_b)
    keep = i < j  # drops self pairs and the mirrored half of identical-hash groups
    i, j = i[keep], j[keep]
    n = len(result.inverse)
    code = np.unique(i * n + j)
    return np.stack([code // n, code % n], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------- clusters

def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes under ``pairs``; each labelled by its smallest member."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n):
        raise ValueError(f"pairs reference nodes outside 0..{n - 1} (min {pairs.min()}, max {pairs.max()})")
    if n == 0:
        return np.empty(0, np.int64)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return _label_by_smallest(comp)


def _label_by_smallest(comp: np.ndarray) -> np.ndarray:
    _, first, inv = np.unique(comp, return_index=True, return_inverse=True)
    return first[inv.reshape(-1)].astype(np.int64)  # first occurrence == smallest row index


def clusters_from_near_pairs(result: NearPairs) -> np.ndarray:
    """Cluster label per original row (smallest row index of its cluster); equal hashes share one."""
    comp_u = clusters(len(result.unique), result.pairs)
    return _label_by_smallest(comp_u[result.inverse])
