"""Throughput of perceptual hashing: a bare imagehash loop vs :func:`compute_hashes` (1 and 2 processes).

All three hash the same in-memory JPEG bytes, generated deterministically here (smooth random
colour fields, 64x64, quality 90), and each includes the JPEG decode.  Prints images/s, the
ratios to the bare loop, and a one-line JSON.  Not a test: run
``python benchmarks/bench_phash.py --images 3000``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import time

import imagehash
import numpy as np
from PIL import Image

from imagegen.stages.dedup import compute_hashes, hash_hex


def make_jpegs(n: int, size: int = 64, seed: int = 0) -> list[bytes]:
    """Deterministic natural-ish images: an 8x8 random colour grid upsampled bicubically, plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
        arr = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bare_loop(blobs: list[bytes]) -> list[imagehash.ImageHash]:
    """The baseline: decode + imagehash.phash, keeping the ImageHash objects (no conversion at all)."""
    return [imagehash.phash(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]


def timed(fn) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds (this process and its finished children) and the result."""
    r0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(r0, r1))
    return wall, cpu, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many rounds; variants interleave")
    args = ap.parse_args()
    blobs = make_jpegs(args.images)
    ref = [str(h) for h in bare_loop(blobs[:200])]
    for procs in (1, 2):
        if hash_hex(compute_hashes(blobs[:200], "phash", processes=procs, chunk_size=50)) != ref:
            raise AssertionError(f"compute_hashes(processes={procs}) disagrees with imagehash")
    variants = {
        "bare imagehash loop": lambda: bare_loop(blobs),
        "compute_hashes p=1": lambda: compute_hashes(blobs, "phash", processes=1),
        "compute_hashes p=2": lambda: compute_hashes(blobs, "phash", processes=2),
    }
    best = {name: (float("inf"), 0.0) for name in variants}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):  # interleaved, so a burst of outside load hits every variant alike
        for name, fn in variants.items():
            wall, cpu, _ = timed(fn)
            if wall < best[name][0]:
                best[name] = (wall, cpu)
    n = len(blobs)
    t_bare = best["bare imagehash loop"][0]
    print(f"{n} images, {os.cpu_count()} cpus, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<22}{'seconds':>9}{'images/s':>10}{'x bare':>8}{'cpu s':>8}{'img/cpu-s':>11}")
    row = {"images": n, "cpus": os.cpu_count(), "load_avg_1m": round(load0, 2)}
    for name, (wall, cpu) in best.items():
        print(f"{name:<22}{wall:>9.3f}{n / wall:>10.1f}{t_bare / wall:>8.2f}{cpu:>8.2f}{n / max(cpu, 1e-9):>11.1f}")
        tag = {"bare imagehash loop": "bare", "compute_hashes p=1": "p1", "compute_hashes p=2": "p2"}[name]
        row[f"{tag}_img_s"] = round(n / wall, 1)
        row[f"{tag}_ratio"] = round(t_bare / wall, 3)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
