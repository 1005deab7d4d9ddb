"""Near-duplicate index benchmark: :func:`imagegen.mih.near_pairs` vs blockwise brute force.

Two inputs per size N:
  random   N uniformly random 64-bit hashes;
  planted  80% random, 10% copies of random rows with 0..radius+1 bits flipped (pairs on both
           sides of the radius), 5% one identical "blank" hash (what solid images all get), 5%
           near-blank hashes (1-2 bits from the blank one: a dense clump that fills one bucket
           in most tables and exercises the oversized-bucket path).
Time is one run without tracing; peak memory is a second run under tracemalloc (numpy reports
its buffers to it).  Brute force runs where N <= --brute-max, in the same process, and the
expanded pair sets must be identical.  Prints a table and a one-line JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import tracemalloc

import numpy as np

from imagegen.mih import brute_force_pairs, expand_pairs, near_pairs

BLANK = np.uint64(0x8000000000000000)  # stand-in for the phash of a solid image


def flip_bits(values: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip ``counts[i]`` distinct random bits of ``values[i]``."""
    out = values.copy()
    for c in np.unique(counts):
        rows = np.flatnonzero(counts == c)
        if c == 0 or len(rows) == 0:
            continue
        # distinct bit positions per row: the first c of a random permutation of 0..63
        bits = np.argsort(rng.random((len(rows), 64)), axis=1)[:, :c].astype(np.uint64)
        masks = np.bitwise_or.reduce(np.left_shift(np.uint64(1), bits), axis=1)
        out[rows] ^= masks
    return out


def make_hashes(n: int, variant: str, radius: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if variant == "random":
        return rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    n_plant, n_blank, n_near_blank = n // 10, n // 20, n // 20
    n_rand = n - n_plant - n_blank - n_near_blank
    base = rng.integers(0, 2**64, n_rand, dtype=np.uint64, endpoint=False)
    src = base[rng.integers(0, n_rand, n_plant)]
    planted = flip_bits(src, rng.integers(0, radius + 2, n_plant), rng)
    near_blank = flip_bits(np.full(n_near_blank, BLANK), rng.integers(1, 3, n_near_blank), rng)
    out = np.concatenate([base, planted, np.full(n_blank, BLANK), near_blank])
    return out[rng.permutation(n)]


def count_row_pairs(res) -> int:
    """Pairs over original rows the result stands for (identical-hash pairs included), without expanding."""
    sizes = np.bincount(res.inverse, minlength=len(res.unique)).astype(np.int64)
    same = int((sizes * (sizes - 1) // 2).sum())
    return same + int((sizes[res.pairs[:, 0]] * sizes[res.pairs[:, 1]]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N")
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--variants", default="random,planted")
    ap.add_argument("--brute-max", type=int, default=20000, help="run brute force for N <= this")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows = []
    hdr = (f"{'variant':<8}{'N':>9}{'unique':>9}{'t/m':>6}{'tables':>7}{'pairs(u)':>10}{'pairs(rows)':>13}"
           f"{'mih s':>8}{'peak MB':>9}{'brute s':>9}{'speedup':>9}  match")
    print(f"radius {args.radius}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    print(hdr)
    for variant in args.variants.split(","):
        for n in sizes:
            h = make_hashes(n, variant, args.radius)
            t0 = time.perf_counter()
            res = near_pairs(h, args.radius)
            t_mih = time.perf_counter() - t0
            peak_mb = None
            if not args.no_memory:
                tracemalloc.start()
                near_pairs(h, args.radius)
                peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
            row_pairs = count_row_pairs(res)
            t_brute = match = None
            if n <= args.brute_max:
                t0 = time.perf_counter()
                ref = brute_force_pairs(h, args.radius)
                t_brute = time.perf_counter() - t0
                got = expand_pairs(res)
                match = bool(np.array_equal(got, ref))
                if not match:
                    raise AssertionError(f"{variant} N={n}: index found {len(got)} pairs, brute force {len(ref)}")
            rows.append({"variant": variant, "n": n, "unique": len(res.unique), "t": res.t, "m": res.blocks,
                         "tables": res.tables, "pairs_unique": len(res.pairs), "pairs_rows": row_pairs,
                         "mih_s": round(t_mih, 3), "peak_mb": None if peak_mb is None else round(peak_mb, 1),
                         "brute_s": None if t_brute is None else round(t_brute, 3), "match": match})
            print(f"{variant:<8}{n:>9}{len(res.unique):>9}{f'{res.t}/{res.blocks}':>6}{res.tables:>7}"
                  f"{len(res.pairs):>10}{row_pairs:>13}{t_mih:>8.3f}"
                  f"{'-' if peak_mb is None else f'{peak_mb:.1f}':>9}"
                  f"{'-' if t_brute is None else f'{t_brute:.2f}':>9}"
                  f"{'-' if t_brute is None else f'{t_brute / t_mih:.0f}x':>9}  {'-' if match is None else match}")
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process max RSS {maxrss_mb:.0f} MB")
    print(json.dumps({"radius": args.radius, "cpus": os.cpu_count(), "max_rss_mb": round(maxrss_mb), "runs": rows}))


if __name__ == "__main__":
    main()
