"""Download stage vs bare img2dataset on the same URL list, in the same run (goal >= 0.95x).

A clean world (no planted faults) is served on loopback; bare img2dataset resizes to the image
size itself and writes parquet; the stage asks img2dataset for raw bytes and decodes, orients,
converts and resizes with PIL, then writes the ledger and image parts.  Each is run ``--repeats``
times alternately; the best wall time of each is compared.

    .venv/bin/python benchmarks/bench_download.py --n 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from imagegen.stages.download import DownloadConfig, run_download  # noqa: E402
from imagegen.world.publish import FAILURE_KINDS, BAD_IMAGE_KINDS, PublishConfig, publish_world, url_table  # noqa: E402
from imagegen.world.scene import WorldConfig  # noqa: E402
from imagegen.world.server import serve_world  # noqa: E402


def clean_publish(n: int) -> PublishConfig:
    zero = {f"{k}_rate": 0.0 for k in (*FAILURE_KINDS, *BAD_IMAGE_KINDS, "exact_dup", "near_dup",
                                        "uninformative", "wrong")}
    return PublishConfig(n_images=n, **zero)


def bare_img2dataset(urls_parquet: Path, out: Path, cfg: DownloadConfig) -> None:
    from img2dataset import download

    download(url_list=str(urls_parquet), input_format="parquet", url_col="url", caption_col="caption",
             output_format="parquet", output_folder=str(out), image_size=cfg.image_size, resize_mode="center_crop",
             processes_count=cfg.processes_count, thread_count=cfg.thread_count, timeout=cfg.timeout,
             number_sample_per_shard=cfg.number_sample_per_shard, enable_wandb=False, compute_hash="sha256")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shard-rows", type=int, default=None,
                    help="img2dataset's number_sample_per_shard for both (default: n / processes, one part per "
                         "process, which leaves the overlapped decode nothing to overlap: every part ends at the end)")
    ap.add_argument("--sequential", action="store_true",
                    help="also run the stage with overlap=False (decode after the fetch: the path before the "
                         "overlap), in the same run")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-download-"))
    publish_world(WorldConfig(), clean_publish(args.n), tmp / "world")
    cfg = DownloadConfig(processes_count=args.processes, thread_count=args.threads, timeout=10, retry_passes=0,
                         number_sample_per_shard=args.shard_rows or max(10, args.n // args.processes))
    names = ("img2dataset", "stage", *(("sequential",) if args.sequential else ()))
    times: dict[str, list[float]] = {k: [] for k in names}
    splits: dict[str, list[dict[str, float]]] = {k: [] for k in names[1:]}  # fetch / decode / ledger, per repeat
    loads: dict[str, list[list[str]]] = {k: [] for k in names}  # the load average after each run
    with serve_world(tmp / "world") as srv:
        urls = url_table(tmp / "world", srv.base_url)
        urls.to_parquet(tmp / "urls.parquet", index=False)
        urls["skip_reason"] = None
        for r in range(args.repeats):
            for name in names:
                out = tmp / f"{name}-{r}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                if name == "img2dataset":
                    bare_img2dataset(tmp / "urls.parquet", out, cfg)
                else:
                    out.mkdir()
                    split: dict[str, float] = {}
                    counts = run_download(urls, cfg, out, progress=False, timings=split,
                                          overlap=name == "stage")
                    splits[name].append(split)
                    assert counts["success"] == args.n, counts
                times[name].append(time.perf_counter() - t0)
                loads[name].append(open("/proc/loadavg").read().split()[:3])
    best = {k: min(v) for k, v in times.items()}
    rate = {k: args.n / v for k, v in best.items()}
    ratio = rate["stage"] / rate["img2dataset"]
    print(f"{'':12} {'best s':>8} {'images/s':>9}   (n={args.n}, processes={args.processes}, threads={args.threads}, "
          f"rows per part={cfg.number_sample_per_shard})")
    for k in names:
        print(f"{k:12} {best[k]:8.2f} {rate[k]:9.1f}   load after each: {loads[k]}")
    print(f"ratio stage / bare img2dataset: {ratio:.3f} (goal >= 0.95)")
    if args.sequential:
        print(f"ratio sequential (decode after the fetch) / bare img2dataset: "
              f"{rate['sequential'] / rate['img2dataset']:.3f}")
    for k in names[1:]:
        for phase in ("fetch", "decode", "ledger"):
            print(f"{k:10} {phase:7} wall " + " ".join(f"{t[f'{phase}_wall_s']:7.2f}" for t in splits[k])
                  + "   CPU " + " ".join(f"{t[f'{phase}_cpu_s']:7.2f}" for t in splits[k]))
    print("(stage: fetch includes the decode that overlapped it; decode is what was left after the fetch)")
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    print(json.dumps({"bench": "download", "n": args.n, "best_seconds": best, "images_per_s": rate,
                      "ratio": round(ratio, 3), "all_seconds": times, "stage_split": splits, "load_after": loads,
                      "loadavg": open("/proc/loadavg").read().split()[:3]}))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
