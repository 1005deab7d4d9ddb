"""Curation at N images: wall and CPU seconds per stage, rows/s, peak RSS of the whole process tree,
and bare img2dataset on the same URL list in the same run.

For each N the embedded world is published at N images (32 px by default, no planted faults), served
on loopback and curated end to end through the plain stage functions (download, dedup, filter with
the reference CLIP, shard; recaption with the world detector only with ``--recaption``, otherwise a
no-op captioner that keeps the alt text).  A sampler thread reads the RSS and CPU times of this
process and every descendant (img2dataset's processes, pool workers, Dask/Ray workers) every 0.1 s;
the memory figure is the tree's summed PSS (RSS with shared pages split between the processes sharing them).

    nice -n 10 .venv/bin/python benchmarks/bench_curate_scale.py --n 10000,30000 --json
    nice -n 10 .venv/bin/python benchmarks/bench_curate_scale.py --n 10000 --runner dask:2 --map-compare

``--map-compare`` also times the CPU-bound map steps (dedup hashing, filter scoring) on the last N's
download output with ``local:1`` against the chosen runner (goal: dask with 2 workers >= 1.7x).  As in
a curate, a cluster runner is started once for both steps (``imagegen.executors.shared_executors``):
its start is timed on its own (``engine_start``), ``speedup`` is per step on the running engine and
``speedup_with_start`` charges the start to the two steps together.  The map steps split by download part
(one img2dataset shard, ``--part-rows`` rows: ``download.number_sample_per_shard``, 5,000 by default), so at
10k rows the default gives 2 parts, one per worker, which cannot balance; ``--part-rows 1250`` gives 8.
Each part runs on ``cores // workers`` threads (``imagegen.executors.thread_caps``); the ``local:1``
baseline on ``--baseline-threads`` (1 by default: one worker against one worker).

    flock /tmp/quiet.lock nice -n 0 .venv/bin/python benchmarks/bench_curate_scale.py --n 10000 --runner dask:2 \
        --map-compare --map-rounds 3 --no-bare --part-rows 1250 --root R   # R: a curate made beforehand
Goals (issue 14, 2 cores): peak RSS at 100k <= 1.3x at 10k; cost growth <= N^1.05; download stage
>= 0.95x bare img2dataset; a 1M-row projection from the measured slope.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import psutil  # noqa: E402  (a dependency of distributed and ray)

from imagegen import curate as C  # noqa: E402
from imagegen.executors import shared_executors  # noqa: E402
from imagegen.presets import CURATE_PRESETS, build_config  # noqa: E402
from imagegen.stages.recaption import register_captioner  # noqa: E402
from imagegen.world.publish import BAD_IMAGE_KINDS, FAILURE_KINDS  # noqa: E402


class AltText:
    """A captioner that keeps nothing new: the bench's recaption stage costs only its I/O."""
    name, model_id, prompt = "alt_text", "alt_text", None

    def __init__(self, cfg: Any) -> None:
        pass

    def caption(self, images: list) -> list[str]:
        return [""] * len(images)


register_captioner("bench_alt_text", AltText, overwrite=True)


class TreeSampler:
    """Peak memory of the process tree (sum of PSS, so pages forked workers share count once) and CPU
    seconds of the tree, sampled."""

    def __init__(self, every: float = 0.1) -> None:
        self.me = psutil.Process()
        self.every = every
        self.cpu: dict[int, float] = {}      # pid -> latest cpu seconds seen
        self.dead_cpu = 0.0
        self.peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self.me, *self.me.children(recursive=True)]
        except psutil.Error:
            return [self.me]

    def sample(self) -> None:
        rss, seen = 0, {}
        for p in self._procs():
            try:
                with p.oneshot():
                    # PSS: a forked worker's pages shared with its parent are counted once, not per process
                    m = p.memory_full_info()
                    rss += getattr(m, "pss", m.rss)
                    t = p.cpu_times()
                    seen[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        with self._lock:
            for pid, c in self.cpu.items():
                if pid not in seen:
                    self.dead_cpu += c  # a process that ended: keep what it had used
            self.cpu = seen
            self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.every)

    def cpu_total(self) -> float:
        self.sample()
        with self._lock:
            return self.dead_cpu + sum(self.cpu.values())

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = 0

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def clean_overrides(n: int, size: int, runner: str, recaption: bool, processes: int, part_rows: int = 5000) -> list[str]:
    zero = [f"source.publish.{k}_rate=0.0" for k in (*FAILURE_KINDS, *BAD_IMAGE_KINDS, "exact_dup", "near_dup",
                                                        "uninformative", "wrong")]
    return [f"name=scale-{n}", f"source.publish.n_images={n}", f"source.world.image_size={size}",
            f"download.image_size={size}", f"download.processes_count={processes}", "download.thread_count=32",
            "download.timeout=10", f"download.number_sample_per_shard={part_rows}", f"runner={runner}",
            "shard.target_shard_size=5000", "filter.min_side=8", *zero,
            *([] if recaption else ["recaption.backend=bench_alt_text"])]


def timed(sampler: TreeSampler, fn, *args) -> tuple[Any, dict[str, float]]:
    sampler.reset_peak()
    c0, t0 = sampler.cpu_total(), time.perf_counter()
    res = fn(*args)
    wall, cpu = time.perf_counter() - t0, sampler.cpu_total() - c0
    return res, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(sampler.peak / 2**20, 1),
                 "load_1min": round(os.getloadavg()[0], 1)}  # the machine's load when the step ended


def bare_img2dataset(urls_parquet: Path, out: Path, size: int, processes: int, part_rows: int = 5000) -> None:
    from img2dataset import download

    download(url_list=str(urls_parquet), input_format="parquet", url_col="url", caption_col="caption",
             output_format="parquet", output_folder=str(out), image_size=size, resize_mode="center_crop",
             processes_count=processes, thread_count=32, timeout=10, number_sample_per_shard=part_rows,
             enable_wandb=False, compute_hash="sha256")


def run_one(n: int, root: Path, args: argparse.Namespace, sampler: TreeSampler) -> dict[str, Any]:
    cfg = build_config(C.CurateConfig, CURATE_PRESETS, "smoke",
                       clean_overrides(n, args.size, args.runner, args.recaption, args.processes, args.part_rows))
    C.check_preconditions(cfg, root)
    with shared_executors():  # as C.curate: one engine for every stage's map steps
        return _run_one(n, root, args, sampler, cfg)


def _run_one(n: int, root: Path, args: argparse.Namespace, sampler: TreeSampler, cfg: Any) -> dict[str, Any]:
    from imagegen.world.publish import url_table
    from imagegen.world.server import serve_world

    world, _ = timed(sampler, C.world_stage, root, cfg.source)
    clip, _ = timed(sampler, C.reference_clip_stage, root, cfg.source, cfg.reference_clip)
    stages: dict[str, dict[str, float]] = {}
    sampler.reset_peak()
    dl, stages["download"] = timed(sampler, C.download_stage, root, cfg.source, world, cfg.download)
    dd, stages["dedup"] = timed(sampler, C.dedup_stage, root, dl, cfg.dedup)
    ff, stages["filter"] = timed(sampler, C.filter_stage, root, dl, dd, cfg.filter, clip)
    rc, stages["recaption"] = timed(sampler, C.recaption_stage, root, dl, ff, cfg.recaption, clip)
    ds, stages["shard"] = timed(sampler, C.shard_stage, root, cfg.name, cfg, dl, dd, ff, rc, world, clip)
    assert dl.counts["success"] == n, dl.counts
    # bare img2dataset on the same list, same server, same run
    bare = None
    with (serve_world(Path(world.path)) if args.bare else contextlib.nullcontext()) as srv:
        if srv is not None:
            urls = url_table(Path(world.path), srv.base_url)
            tmp = root / "bare" / str(n)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            urls[["url", "caption"]].to_parquet(tmp / "urls.parquet", index=False)
            _, bare = timed(sampler, bare_img2dataset, tmp / "urls.parquet", tmp / "out", args.size, args.processes,
                            args.part_rows)
            shutil.rmtree(tmp, ignore_errors=True)
    wall = sum(s["wall_s"] for s in stages.values())
    cpu = sum(s["cpu_s"] for s in stages.values())
    out = {"n": n, "runner": args.runner, "stages": stages, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
           "rows_per_s": round(n / wall, 1), "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
           "bare_img2dataset": bare,
           "download_vs_bare": round(bare["wall_s"] / stages["download"]["wall_s"], 3) if bare else None,
           "kept": ds.counts.get("shard", {}).get("samples"), "parts": dl.counts.get("parts"),
           "dirs": {"download": dl.path, "dedup": dd.path}, "clip": clip.path}
    return out


def map_compare(last: dict[str, Any], root: Path, args: argparse.Namespace, sampler: TreeSampler) -> dict[str, Any]:
    """The CPU-bound map steps on one download output: local:1 against the chosen runner."""
    from imagegen.stages.dedup import LEDGER_COLUMNS, DedupConfig, run_dedup
    from imagegen.stages.ledger import compact_copy
    from imagegen.stages.filter import FilterConfig, run_filter

    from imagegen.executors import executor, map_threads

    dl = Path(last["dirs"]["download"])
    fcfg = FilterConfig(min_side=8)
    res: dict[str, Any] = {}
    def start(runner: str, where: Path) -> None:
        with executor(runner, root=where):  # inside shared_executors: the engine stays up for the steps
            pass

    steps = ("dedup_hash", "filter_score")
    for runner in ("local:1", args.runner):
        out = root / "mapcmp" / runner.replace(":", "_").replace("/", "_")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        ledger = compact_copy(dl, LEDGER_COLUMNS, out / "ledger.parquet")  # the ledger is per-part files
        # the baseline is one worker on --baseline-threads threads (default 1: like one worker of dask:2 on 2
        # cores, whose parts run on cores // workers threads each); the runner keeps its own caps
        caps = map_threads(args.baseline_threads) if runner == "local:1" else contextlib.nullcontext()
        with shared_executors(), caps:
            _, s0 = timed(sampler, start, runner, out)
            with executor(runner) as ex:
                threads = ex.threads
            res[runner] = {"engine_start": s0, "rounds": [], "workers": ex.workers, "threads_per_worker": threads}
            # round 1 on a fresh engine (its workers import the steps' modules and load the CLIP: what a
            # curate's stage meets), later rounds on the warm one (a long-lived cluster, a larger curate)
            for _ in range(args.map_rounds):
                _, a = timed(sampler, run_dedup, dl / "images", ledger, DedupConfig(), out / "dedup.parquet", runner)
                _, b = timed(sampler, lambda: run_filter(dl, out / "dedup.parquet", fcfg, out / "filter.parquet",
                                                         resolve_model=lambda s: f"local-dir:{last['clip']}",
                                                         runner=runner))
                res[runner]["rounds"].append({"dedup_hash": a, "filter_score": b})
    base, other = res["local:1"], res[args.runner]
    res["speedup"] = [{k: round(x[k]["wall_s"] / y[k]["wall_s"], 2) for k in steps}
                      for x, y in zip(base["rounds"], other["rounds"])]
    first_b, first_o = base["rounds"][0], other["rounds"][0]
    res["speedup_with_start"] = round(sum(first_b[k]["wall_s"] for k in steps) /
                                      (other["engine_start"]["wall_s"] + sum(first_o[k]["wall_s"] for k in steps)), 2)
    res["parts"] = last.get("parts")
    return res


def projection(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if len(rows) < 2:
        return {}
    a, b = rows[0], rows[-1]
    slope = math.log(b["wall_s"] / a["wall_s"]) / math.log(b["n"] / a["n"])
    cpu_slope = math.log(b["cpu_s"] / a["cpu_s"]) / math.log(b["n"] / a["n"])
    scale = (1_000_000 / b["n"])
    wall_1m = b["wall_s"] * scale ** slope
    cpu_1m = b["cpu_s"] * scale ** cpu_slope
    # the map steps spread over cores/workers; the driver's global steps (decide, plan, ledger) do not
    return {"wall_exponent": round(slope, 3), "cpu_exponent": round(cpu_slope, 3),
            "wall_1m_s_here": round(wall_1m), "cpu_1m_s": round(cpu_1m),
            "wall_1m_s_16_cores_if_cpu_bound": round(cpu_1m / 16 / 0.85),
            "wall_1m_s_10_nodes_x16_if_cpu_bound": round(cpu_1m / 160 / 0.85)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="10000,30000,100000", help="comma-separated sizes")
    ap.add_argument("--runner", default="local", help="local | local:N | dask | dask:N | dask://H:P | ray ...")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--processes", type=int, default=2, help="img2dataset processes (both the stage and bare)")
    ap.add_argument("--recaption", action="store_true", help="run the world detector captioner too")
    ap.add_argument("--map-compare", action="store_true", help="time dedup/filter map steps: local:1 vs --runner")
    ap.add_argument("--map-rounds", type=int, default=2, help="rounds of the map steps on one engine (--map-compare)")
    ap.add_argument("--part-rows", type=int, default=5000,
                    help="rows per download part (download.number_sample_per_shard, bare img2dataset too); the "
                         "map steps split by part, so --map-compare wants several parts per worker (e.g. 1250)")
    ap.add_argument("--baseline-threads", type=int, default=1,
                    help="threads of the local:1 baseline of --map-compare (default 1, as one dask:2 worker on 2 cores)")
    ap.add_argument("--no-bare", dest="bare", action="store_false", help="skip bare img2dataset (e.g. a rerun on --root)")
    ap.add_argument("--root", default=None, help="data root (default: a temporary folder, removed after)")
    ap.add_argument("--json", action="store_true", help="print one JSON line with every figure at the end")
    args = ap.parse_args()
    sizes = [int(x) for x in args.n.split(",") if x]
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-curate-scale-"))
    sampler = TreeSampler()
    rows = []
    try:
        for n in sizes:
            r = run_one(n, root, args, sampler)
            rows.append(r)
            st = " ".join(f"{k}={v['wall_s']:.0f}/{v['cpu_s']:.0f}s" for k, v in r["stages"].items())
            print(f"n={n}: wall {r['wall_s']:.0f} s, cpu {r['cpu_s']:.0f} s, {r['rows_per_s']:.0f} rows/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, download/bare {r['download_vs_bare']}  [{st}]",
                  flush=True)
        result: dict[str, Any] = {"bench": "curate_scale", "runner": args.runner, "size": args.size, "rows": rows,
                                  "projection": projection(rows)}
        if len(rows) >= 2:
            result["rss_ratio_last_first"] = round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
        if args.map_compare:
            result["map_compare"] = map_compare(rows[-1], root, args, sampler)
            print("map steps local:1 vs", args.runner, json.dumps(result["map_compare"]["speedup"]), flush=True)
        print("projection:", json.dumps(result["projection"]))
        if args.json:
            print(json.dumps(result))
    finally:
        sampler.stop()
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
