"""Loader throughput vs a bare decode loop over the same shard members, in one run.

The bare loop is the floor any loader pays: read each tar member with ``tarfile``, decode with
PIL, convert to a float tensor in [-1, 1].  The goal is loader >= 0.9x bare at num_workers=0
(one process doing the same work plus webdataset's grouping, the shuffle buffer and batching).
A second reference, "bare + stack", adds only ``torch.stack`` into batches: at large image
sizes a fresh float batch tensor costs about as much as the JPEG decode (the kernel zero-fills
every new page), which no batching loader avoids.  num_workers=2 shows what worker processes
add on this machine.

    .venv/bin/python benchmarks/bench_loader.py [--n 3000] [--size 64] [--repeats 5]

Prints a table and one line of JSON.  Times are wall-clock, best of ``--repeats`` rounds in
which the runs take turns (so a burst of load elsewhere hits all of them); num_workers>0
figures include starting the workers, as a non-persistent loader pays each epoch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.loader import make_loader  # noqa: E402
from imagegen.stages.shard import ShardConfig, write_shards  # noqa: E402


def synth_jpeg(i: int, size: int, quality: int) -> bytes:
    """A photo-like image (smooth colour field plus grain) so JPEG size and decode cost are realistic."""
    rng = np.random.default_rng(i)
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def bare_loop(shards: list[Path]) -> int:
    """tarfile + PIL decode + tensor, nothing else."""
    n = 0
    for path in shards:
        with tarfile.open(path) as tf:
            for member in tf:
                data = tf.extractfile(member).read()
                if member.name.endswith((".jpg", ".png")):
                    with Image.open(io.BytesIO(data)) as im:
                        arr = np.asarray(im.convert("RGB"))
                    t = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)
                    n += t.shape[0] > 0
                elif member.name.endswith(".txt"):
                    data.decode("utf-8")
    return n


def bare_batched_loop(shards: list[Path], batch_size: int) -> int:
    """The bare loop plus what any batching loader must add: one float batch tensor per batch."""
    n, pending = 0, []
    for path in shards:
        with tarfile.open(path) as tf:
            for member in tf:
                data = tf.extractfile(member).read()
                if member.name.endswith((".jpg", ".png")):
                    with Image.open(io.BytesIO(data)) as im:
                        arr = np.asarray(im.convert("RGB"))
                    pending.append(torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0))
                    if len(pending) == batch_size:
                        n += torch.stack(pending).shape[0]
                        pending = []
                elif member.name.endswith(".txt"):
                    data.decode("utf-8")
    return n + (torch.stack(pending).shape[0] if pending else 0)


def loader_loop(shards: list[Path], num_workers: int, batch_size: int) -> int:
    loader = make_loader(shards, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=1000)
    return sum(batch["image"].shape[0] for batch in loader)


def interleaved_best(repeats: int, runs: dict[str, tuple]) -> dict[str, tuple[float, int]]:
    """Best time per run, the runs taking turns, so a burst of load elsewhere hits all of them."""
    best = {name: (float("inf"), 0) for name in runs}
    for _ in range(repeats):
        for name, (fn, *fargs) in runs.items():
            t0 = time.perf_counter()
            count = fn(*fargs)
            best[name] = (min(best[name][0], time.perf_counter() - t0), count)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="images")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (the download stage default is 64)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads in this process (DataLoader workers always use 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    with tempfile.TemporaryDirectory() as tmp:
        samples = ({"key": f"{i:07d}", "image": synth_jpeg(i, args.size, args.quality), "ext": "jpg",
                    "caption": f"synthetic image {i}", "meta": {"i": i}} for i in range(args.n))
        infos = write_shards(samples, tmp, ShardConfig(target_shard_size=args.shard_size))
        shards = [Path(tmp) / info.name for info in infos]
        total_mb = sum(info.bytes for info in infos) / 1e6

        bare_loop(shards)  # warm the page cache and PIL
        runs: dict[str, tuple] = {"bare decode loop": (bare_loop, shards),
                                  f"bare + stack batches of {args.batch_size}": (bare_batched_loop, shards,
                                                                                 args.batch_size)}
        for w in args.workers:
            runs[f"make_loader num_workers={w}"] = (loader_loop, shards, w, args.batch_size)
        best = interleaved_best(args.repeats, runs)
    rows = []
    for name, (t, n) in best.items():
        assert n == args.n, (name, n)
        rows.append((name, n, t, n / t))
    bare_rate = rows[0][3]

    print(f"{args.n} JPEGs {args.size}x{args.size} q{args.quality}, {len(shards)} shards, {total_mb:.1f} MB; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {args.threads} thread(s), "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<30} {'images':>7} {'seconds':>8} {'images/s':>9} {'x bare':>7}")
    for name, n, t, rate in rows:
        print(f"{name:<30} {n:>7} {t:>8.3f} {rate:>9.1f} {rate / bare_rate:>7.2f}")
    result = {"bench": "loader", "n": args.n, "size": args.size, "shards": len(shards), "cpus": os.cpu_count(),
              "threads": args.threads, "batch_size": args.batch_size, "bare_images_per_s": round(bare_rate, 1),
              "bare_batched_images_per_s": round(rows[1][3], 1), "goal_ratio": 0.9}
    for name, _, _, rate in rows[2:]:
        w = name.rsplit("=", 1)[1]
        result[f"loader_w{w}_images_per_s"] = round(rate, 1)
        result[f"ratio_w{w}"] = round(rate / bare_rate, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
