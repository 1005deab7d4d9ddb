"""The shard stage alone: wall, CPU and peak RSS at N rows, per runner.

Builds a synthetic download folder (noise JPEGs in parts of ``--part-rows``), runs the real dedup,
filter (no CLIP) and recaption stages once, then times ``imagegen.curate.shard_stage`` in a fresh
subprocess per runner (so each peak RSS is that run's own), deleting the dataset between runs.
Prints a table and one JSON line.  Memory: the PSS (proportional set size, so pages forked workers share count once) of the stage's whole process tree (the process
and its pool workers), sampled every 20 ms: its peak, the value just before the stage (imports
done) and the growth between them, in MB.

    .venv/bin/python benchmarks/bench_shard.py --n 4000 --runners local:1,local:2 [--root DIR] [--json]

Run it with another tree on PYTHONPATH (e.g. an older commit's files) to measure that code's shard
stage on the same inputs (the driver script, this file, is the same).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, os, resource, shutil, sys, time
from pathlib import Path
from imagegen import curate as C
from imagegen.stages.shard import ShardConfig
root, runner, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
chain = json.loads((root / "chain.json").read_text())
res = {k: C.StageResult.model_validate(v) for k, v in chain.items()}
cfg = C.CurateConfig(name="bench", shard=ShardConfig(target_shard_size=size), runner=runner)
import threading, psutil
me = psutil.Process()
def tree_rss():
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss  # PSS: forked workers share the parent's pages
        except psutil.Error:
            pass
    return total / 2**20
peak = {"tree": tree_rss()}
base = peak["tree"]
done = threading.Event()
def sample():
    while not done.wait(0.02):
        peak["tree"] = max(peak["tree"], tree_rss())
th = threading.Thread(target=sample, daemon=True)
th.start()
ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
ds = C.shard_stage(root, "bench", cfg, res["download"], res["dedup"], res["filter"], res["recaption"], None, None)
wall = time.perf_counter() - t0
done.set(); th.join()
ru1, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) + (ch.ru_utime - ch0.ru_utime) + (ch.ru_stime - ch0.ru_stime)
card = json.loads((Path(ds.path) / "card.json").read_text())
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_mb": ru1.ru_maxrss / 1024, "base_mb": base, "tree_peak_mb": peak["tree"],
                  "shards": [s["sha256"] for s in card["shards"]], "samples": ds.counts["shard"]["samples"],
                  "cached": ds.cached}))
shutil.rmtree(ds.path)
"""


def build_chain(root: Path, n: int, part_rows: int, side: int) -> None:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from imagegen import curate as C
    from imagegen.hashing import bytes_sha256
    from imagegen.stages.dedup import DedupConfig
    from imagegen.stages.download import IMAGE_SCHEMA, LEDGER_COLUMNS
    from imagegen.stages.filter import FilterConfig
    from imagegen.stages.recaption import RecaptionConfig

    d = root / "stages" / "download" / f"bench-{n}"
    if not (root / "chain.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        (d / "images").mkdir(parents=True)
        rng = np.random.default_rng(0)
        led = []
        for p, start in enumerate(range(0, n, part_rows)):
            cols: dict[str, list] = {k: [] for k in IMAGE_SCHEMA.names}
            for rid in range(start, min(n, start + part_rows)):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=90)
                blob, key = buf.getvalue(), f"{rid:09d}"
                for k, v in (("key", key), ("row_id", rid), ("image", blob), ("ext", "jpg"), ("sha256", bytes_sha256(blob)),
                             ("width", side), ("height", side), ("caption", f"picture {rid}")):
                    cols[k].append(v)
                led.append({"row_id": rid, "url": f"http://x.invalid/{rid}", "caption": f"picture {rid}",
                            "status": "success", "attempts": 1, "key": key, "original_width": side,
                            "original_height": side, "width": side, "height": side,
                            "source_sha256": bytes_sha256(blob), "sha256": bytes_sha256(blob)})
            pq.write_table(pa.table(cols, schema=IMAGE_SCHEMA), d / "images" / f"part-{p:05d}.parquet", row_group_size=1000)
        ledger = pd.DataFrame(led, columns=LEDGER_COLUMNS)
        for col in ("attempts", "original_width", "original_height", "width", "height"):
            ledger[col] = ledger[col].astype("Int64")
        ledger["exif_transposed"] = ledger["exif_transposed"].astype("boolean")
        ledger.to_parquet(d / "ledger.parquet", index=False)
        (d / "card.json").write_text(json.dumps({"stage": "download", "id": d.name, "counts": {}}))
        dl = C.StageResult("download", d.name, str(d))
        dd = C.dedup_stage(root, dl, DedupConfig(runner="local:1"))
        ff = C.filter_stage(root, dl, dd, FilterConfig(clip_score=None, min_side=8, runner="local:1"), None)
        rc = C.recaption_stage(root, dl, ff, RecaptionConfig(policy="keep_both"), None)
        (root / "chain.json").write_text(json.dumps({r.stage: r.model_dump() for r in (dl, dd, ff, rc)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--part-rows", type=int, default=500)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--runners", default="local:1,local:2")
    ap.add_argument("--root", default=None, help="keep the synthetic inputs here (reused by a second run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-shard-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_chain(root, args.n, args.part_rows, args.side)
    setup = time.perf_counter() - t0
    rows = []
    for runner in args.runners.split(","):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(root), runner, str(args.shard_size)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            sys.exit(f"shard stage on {runner} failed:\n{out.stderr[-4000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["runner"] = runner
        rows.append(r)
    same = len({tuple(r["shards"]) for r in rows}) == 1
    load = os.getloadavg()[0]
    import imagegen
    print(f"shard stage, {args.n} rows in parts of {args.part_rows}, shards of {args.shard_size}, "
          f"{args.side}px JPEG (setup {setup:.0f} s; load {load:.2f}; code {Path(imagegen.__file__).parent})")
    print(f"{'runner':10} {'wall s':>8} {'CPU s':>8} {'tree PSS peak':>13} {'before MB':>10} {'growth MB':>10}")
    for r in rows:
        print(f"{r['runner']:10} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['tree_peak_mb']:13.0f} {r['base_mb']:10.0f} "
              f"{r['tree_peak_mb'] - r['base_mb']:10.0f}")
    print(f"same shard sha256s across runners: {same}")
    if args.json:
        import hashlib
        print(json.dumps({"n": args.n, "load": load, "same_shards": same,
                          "shards_digest": hashlib.sha256("".join(rows[0]["shards"]).encode()).hexdigest()[:16],
                          "runs": [{k: v for k, v in r.items() if k != "shards"} for r in rows]}))


if __name__ == "__main__":
    main()
