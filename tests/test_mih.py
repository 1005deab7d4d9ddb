"""The multi-index-hashing search must return exactly the pairs brute force finds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imagegen import mih
from imagegen.mih import (brute_force_pairs, choose_t, clusters, clusters_from_near_pairs, expand_pairs,
                          near_pairs)

BLANK = np.uint64(0x8000000000000000)


def flip(values: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = values.copy()
    for i, c in enumerate(counts):
        for b in rng.choice(64, int(c), replace=False):
            out[i] ^= np.uint64(1) << np.uint64(int(b))
    return out


def random_hashes(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


def planted(n: int, radius: int, rng: np.random.Generator) -> np.ndarray:
    """Random hashes plus copies at distance 0..radius+2 (both sides of the boundary)."""
    base = random_hashes(n, rng)
    src = base[rng.integers(0, n, n // 2)]
    near = flip(src, rng.integers(0, radius + 3, len(src)), rng)
    return rng.permutation(np.concatenate([base, near]))


def skewed(n: int, rng: np.random.Generator) -> np.ndarray:
    """Like real phashes of a crawl: a pile of identical blanks, a dense clump around them, few bits used."""
    pile = np.full(n // 4, BLANK)
    clump = flip(np.full(n // 4, BLANK), rng.integers(1, 4, n // 4), rng)
    # low-entropy hashes: only 20 random bits, so many keys collide in every table
    low = random_hashes(n // 2, rng) & np.uint64(0x00000F0F0F0F0F00)
    return rng.permutation(np.concatenate([pile, clump, low]))


def assert_valid(res: mih.NearPairs, hashes: np.ndarray, radius: int) -> None:
    p = res.pairs
    assert p.dtype == np.int64 and res.distances.dtype == np.uint8 and res.inverse.dtype == np.int64
    assert np.array_equal(res.unique[res.inverse], hashes)
    assert np.all(res.unique[1:] > res.unique[:-1])
    if len(p):
        assert np.all(p[:, 0] < p[:, 1])
        code = p[:, 0] * len(res.unique) + p[:, 1]
        assert np.all(np.diff(code) > 0), "pairs must be sorted and free of duplicates"
        d = np.bitwise_count(res.unique[p[:, 0]] ^ res.unique[p[:, 1]])
        assert np.array_equal(d, res.distances)
        assert d.min() >= 1 and d.max() <= radius


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["random", "planted", "skewed"])
@pytest.mark.slow
def test_index_equals_brute_force(seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    for radius in range(0, 7):
        h = {"random": lambda: random_hashes(1500, rng), "planted": lambda: planted(800, radius, rng),
             "skewed": lambda: skewed(1200, rng)}[kind]()
        ref = brute_force_pairs(h, radius)
        for cap in (256, 2):  # cap=2 sends every bucket through the oversized-bucket brute force
            res = near_pairs(h, radius, bucket_cap=cap)
            assert_valid(res, h, radius)
            got = expand_pairs(res)
            assert np.array_equal(got, ref), f"{kind} seed {seed} radius {radius} cap {cap}: " \
                f"{len(got)} pairs vs brute force {len(ref)}"
        if kind == "planted" and radius >= 2:
            assert len(ref) > 0  # the comparison above was not vacuous


@pytest.mark.parametrize("t", [1, 2, 3, 5])
def test_every_t_is_exact(t: int) -> None:
    rng = np.random.default_rng(10 + t)
    h = np.concatenate([planted(600, 5, rng), skewed(400, rng)])
    ref = brute_force_pairs(h, 5)
    res = near_pairs(h, 5, t=t)
    assert (res.t, res.blocks, res.tables) == (t, 5 + t, math.comb(5 + t, t))
    assert np.array_equal(expand_pairs(res), ref)


def test_large_radius_exact() -> None:
    rng = np.random.default_rng(7)
    h = np.concatenate([planted(300, 16, rng), skewed(200, rng)])
    for radius in (10, 16):
        res = near_pairs(h, radius)
        assert res.tables <= 256
        assert np.array_equal(expand_pairs(res), brute_force_pairs(h, radius))


def test_boundary_distance_included_and_next_excluded() -> None:
    h = np.array([0, 0b1111, 0b11111 << 20, (1 << 64) - 1], dtype=np.uint64)  # d(0,1)=4, d(0,2)=5
    res = near_pairs(h, 4)
    assert res.pairs.tolist() == [[0, 1]] and res.distances.tolist() == [4]
    assert brute_force_pairs(h, 5).tolist() == [[0, 1], [0, 2]]
    assert np.array_equal(expand_pairs(near_pairs(h, 5)), brute_force_pairs(h, 5))


def test_identical_pile_is_one_node() -> None:
    rng = np.random.default_rng(3)
    others = random_hashes(50, rng)
    h = np.concatenate([np.full(20_000, BLANK), others, [BLANK ^ np.uint64(1)]])
    res = near_pairs(h, 4)
    assert len(res.unique) == 52
    # only the near-blank hash pairs with the blank node: one pair, not ~2e8
    blank_u = int(np.searchsorted(res.unique, BLANK))
    near_u = int(np.searchsorted(res.unique, BLANK ^ np.uint64(1)))
    assert res.pairs.tolist() == [sorted([blank_u, near_u])]
    labels = clusters_from_near_pairs(res)
    assert np.all(labels[:20_000] == 0) and labels[-1] == 0
    assert len(np.unique(labels)) == 51
    assert np.array_equal(labels[20_000:20_050], np.arange(20_000, 20_050))


def test_radius_zero_groups_only_identical() -> None:
    h = np.array([5, 7, 5, 6, 7, 5], dtype=np.uint64)
    res = near_pairs(h, 0)
    assert len(res.pairs) == 0 and res.tables == 0
    assert expand_pairs(res).tolist() == [[0, 2], [0, 5], [1, 4], [2, 5]]
    assert clusters_from_near_pairs(res).tolist() == [0, 1, 0, 3, 1, 0]


def test_clusters_labels_by_smallest_member() -> None:
    pairs = np.array([[2, 1], [1, 0], [5, 4], [7, 4]])
    assert clusters(8, pairs).tolist() == [0, 0, 0, 3, 4, 4, 6, 4]
    assert clusters(3, np.empty((0, 2), np.int64)).tolist() == [0, 1, 2]
    assert clusters(0, np.empty((0, 2), np.int64)).tolist() == []
    with pytest.raises(ValueError, match="outside 0..2"):
        clusters(3, np.array([[0, 3]]))


def test_clusters_from_near_pairs_chains_transitively() -> None:
    # 0 -- 3 -- 2 by distance-2 steps: 0 and 2 are 4 apart, so radius 2 joins them only via 3
    h = np.array([0b0000, 0b1111_0000_0000, 0b1111, 0b11, 0b1111_0000_0000], dtype=np.uint64)
    res = near_pairs(h, 2)
    assert clusters_from_near_pairs(res).tolist() == [0, 1, 0, 0, 1]


def test_choose_t_follows_key_width_rule() -> None:
    for n, radius in [(10_000, 4), (100_000, 4), (1_000_000, 4), (1_000_000, 2), (50_000, 6)]:
        t = choose_t(n, radius)
        m = radius + t
        assert mih._min_key_bits(m, t) >= math.log2(n) + 1
        if t > 1:  # and it is the smallest such t
            assert mih._min_key_bits(m - 1, t - 1) < math.log2(n) + 1
    t = choose_t(1_000_000, 16, max_tables=256)  # rule unreachable within 256 tables: cost fallback
    assert math.comb(16 + t, t) <= 256


def test_block_layout_covers_64_bits() -> None:
    for m in (1, 5, 6, 7, 17, 64):
        layout = mih.block_layout(m)
        assert sum(w for _, w in layout) == 64 and layout[-1][0] == 0
        assert max(w for _, w in layout) - min(w for _, w in layout) <= 1


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((2, 2), np.uint64), "1-D"),
    (np.array([1.0, 2.0]), "dtype float64"),
    (np.array([-1, 2]), "negative"),
])
def test_bad_hashes_refused(bad: np.ndarray, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        near_pairs(bad, 2)
    with pytest.raises(ValueError, match=msg):
        brute_force_pairs(bad, 2)


@pytest.mark.parametrize("radius", [-1, 17, 2.5, True])
def test_bad_radius_refused(radius: object) -> None:
    with pytest.raises(ValueError, match="radius"):
        near_pairs(np.zeros(3, np.uint64), radius)  # type: ignore[arg-type]


def test_small_inputs() -> None:
    assert len(near_pairs(np.empty(0, np.uint64), 4).pairs) == 0
    assert expand_pairs(near_pairs(np.array([9], np.uint64), 4)).shape == (0, 2)
    assert brute_force_pairs(np.empty(0, np.uint64), 3).shape == (0, 2)
    assert clusters_from_near_pairs(near_pairs(np.empty(0, np.uint64), 4)).tolist() == []
