"""Fault drills with figures: faults injected and survived, rows lost, bytes differing after
recovery, time to recover against a clean run of the same request (all in this run).

    nice -n 10 .venv/bin/python benchmarks/bench_faults.py [--workdir DIR] [--seed 12]

1. A clean tiny curate (``imagegen.faultinject.TINY_CURATE``) in its own data root: the reference
   bytes and the clean wall time.  The world plants its HTTP and image faults (404, flaky 500,
   stall past the timeout, truncated body, HTML page, corrupt/CMYK/16-bit/... images, duplicates):
   each must end in ``accounting.parquet`` with an outcome.
2. For each curate stage after the world: a fresh data root holding copies of the finished stages
   before it (what an earlier run would have left), a run killed with SIGKILL to its process group
   a random moment after that stage starts writing its output (its temporary folder appears; at
   most a quarter of its clean duration later), then a rerun; compared byte for byte with the
   reference.  A kill that did not land mid-stage (exit not -SIGKILL, or the stage's output
   complete) counts as not survived.
3. ``imagegen train`` killed once a random checkpoint is on disk and rerun, against an
   uninterrupted run: the last checkpoint's tensors (``imagegen.faultinject.train_drill``).
4. ``imagegen distill`` (reflow) killed once its student has a random checkpoint, rerun, against
   an uninterrupted distillation: pairs dataset, student tensors, NFE report (``distill_drill``).
5. ``imagegen evaluate`` (FD + KID) killed once some of its images are on disk, rerun, against an
   uninterrupted evaluation: every generated PNG, metric values and intervals (``evaluate_drill``).
6. Two concurrent runs of the same request on one data root.

"survived" for the drills of 3-5: the kill landed mid-work and the rerun ended on identical bytes,
reusing what was complete (the checkpoint, the pairs, the finished image batches).

Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from imagegen import faultinject as F  # noqa: E402


def _ok(o: F.Outcome) -> dict:
    if o.returncode != 0 or o.result is None:
        raise RuntimeError(f"exit {o.returncode}:\n{o.stderr[-3000:]}")
    return o.result


def rows_lost(reference: dict, result: dict) -> int:
    a = pd.read_parquet(Path(reference["path"]) / "accounting.parquet")
    b = pd.read_parquet(Path(result["path"]) / "accounting.parquet")
    return int(len(set(a["row_id"]) - set(b["row_id"])))


def bytes_differing(ref_digests: dict[str, str], path: str) -> int:
    got = F.dataset_digests(path)
    return sum(1 for k in set(ref_digests) | set(got) if ref_digests.get(k) != got.get(k))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--stages", default=",".join(F.CURATE_STAGES[1:]),
                    help="curate stages to kill in (comma-separated; default: every stage after the world)")
    ap.add_argument("--no-train", action="store_true", help="skip the training, distill and evaluate drills")
    ap.add_argument("--no-distill", action="store_true", help="skip the distill drill")
    ap.add_argument("--no-evaluate", action="store_true", help="skip the evaluate drill")
    ap.add_argument("--no-concurrent", action="store_true", help="skip the two concurrent runs")
    args = ap.parse_args()
    wanted = set(args.stages.split(",")) if args.stages else set()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-faults-"))
    rng = random.Random(args.seed)
    rows: list[dict] = []

    clean_root = work / "clean"
    t0 = time.perf_counter()
    clean = F.run(F.curate_cmd(clean_root))
    ref = _ok(clean)
    clean_s = time.perf_counter() - t0
    ref_digests = F.dataset_digests(ref["path"])
    seconds = F.stage_seconds(clean_root)
    world_dir = next((clean_root / "stages" / "world").iterdir())
    truth = pd.read_parquet(world_dir / "truth.parquet")
    acc = pd.read_parquet(Path(ref["path"]) / "accounting.parquet")
    planted = truth[truth["planted"] != "clean"]
    outcomes = acc.set_index("row_id")["outcome"]
    rows.append({"fault": "world HTTP/image faults (planted rows)", "injected": len(planted),
                 "survived": int(planted["row_id"].isin(outcomes.index).sum()), "rows_lost": rows_lost(ref, ref),
                 "bytes_differing": 0, "recover_s": None, "clean_s": round(clean_s, 1)})

    for before, stage in zip(F.CURATE_STAGES, F.CURATE_STAGES[1:]):
        if stage not in wanted:
            continue
        root = work / f"kill-{stage}"
        for done in F.CURATE_STAGES[:F.CURATE_STAGES.index(stage)]:
            shutil.copytree(clean_root / F.STAGE_PARENTS[done], root / F.STAGE_PARENTS[done], dirs_exist_ok=True)
        delay = F.random_delay(rng, 0.25 * seconds[stage])
        killed, at_kill = F.kill_curate_in(root, stage, delay)
        t1 = time.perf_counter()
        res = _ok(F.run(F.curate_cmd(root)))
        rows.append({"fault": f"kill -9 curate in {stage} (+{delay:.2f} s)", "injected": 1,
                     "survived": int(killed.sigkilled and not at_kill["complete"]
                                     and res["dataset_id"] == ref["dataset_id"]),
                     "rows_lost": rows_lost(ref, res), "bytes_differing": bytes_differing(ref_digests, res["path"]),
                     "recover_s": round(time.perf_counter() - t1, 1), "clean_s": round(clean_s, 1),
                     "leftovers": len(F.leftovers(root))})

    if not args.no_train:
        teacher_root, teacher = train_drill(rows, rng, ref, clean_root, work)
        if not args.no_distill:
            drill_row(rows, F.distill_drill(teacher_root, teacher, work, rng))
        if not args.no_evaluate:
            drill_row(rows, F.evaluate_drill(teacher_root, teacher, work, rng))
    if not args.no_concurrent:
        concurrent_drill(rows, ref, ref_digests, clean_s, work)
    print_table(rows, clean_s, ref)
    total = {"injected": sum(r["injected"] for r in rows), "survived": sum(r["survived"] for r in rows),
             "rows_lost": sum(r["rows_lost"] for r in rows), "bytes_differing": sum(r["bytes_differing"] for r in rows)}
    print(json.dumps({"bench": "faults", "rows": rows, "total": total, "workdir": str(work)}))
    return 0 if total["rows_lost"] == 0 and total["bytes_differing"] == 0 else 1


def train_drill(rows: list[dict], rng: random.Random, ref: dict, clean_root: Path, work: Path) -> tuple[Path, str]:
    """The uninterrupted tiny training run (in a copy of the clean root: the teacher of the distill
    and evaluate drills) and the kill-and-rerun drill against it; returns (teacher root, run id)."""
    teacher_root = F.copy_root(clean_root, work / "teacher")
    straight = F.run(F.train_cmd(teacher_root, ref["dataset_id"], "train.seed=1"))
    res = _ok(straight)
    drill_row(rows, F.train_drill(clean_root, ref["dataset_id"], res, straight.seconds, work, rng, "train.seed=1"))
    return teacher_root, res["run_id"]


def drill_row(rows: list[dict], d: F.Drill) -> None:
    """A row of the table from a kill-and-rerun drill (rows lost: none of these stages drops input rows)."""
    ok = d.killed.sigkilled and d.rerun.returncode == 0 and not d.differing and bool(d.reused) and all(d.reused.values())
    if not ok:
        print(f"{d.name}: rc {d.killed.returncode}, at kill {d.at_kill}, differing {d.differing[:5]}, "
              f"reused {d.reused}\n{d.rerun.stderr[-2000:]}", file=sys.stderr)
    rows.append({"fault": d.name, "injected": 1, "survived": int(ok), "rows_lost": 0,
                 "bytes_differing": len(d.differing), "recover_s": round(d.recover_s, 1),
                 "clean_s": round(d.clean_s, 1), "leftovers": len(d.leftovers)})


def concurrent_drill(rows: list[dict], ref: dict, ref_digests: dict, clean_s: float, work: Path) -> None:
    croot = work / "concurrent"
    outs: list[F.Outcome] = []
    t1 = time.perf_counter()
    threads = [threading.Thread(target=lambda: outs.append(F.run(F.curate_cmd(croot)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = [_ok(o) for o in outs]
    rows.append({"fault": "two concurrent curates, one data root", "injected": 1,
                 "survived": int(len({r["path"] for r in res}) == 1),
                 "rows_lost": rows_lost(ref, res[0]),
                 "bytes_differing": max(bytes_differing(ref_digests, r["path"]) for r in res),
                 "recover_s": round(time.perf_counter() - t1, 1), "clean_s": round(clean_s, 1),
                 "leftovers": len(F.leftovers(croot))})


def print_table(rows: list[dict], clean_s: float, ref: dict) -> None:
    print(f"\nload average {os.getloadavg()[0]:.1f}, clean tiny curate {clean_s:.1f} s, dataset {ref['dataset_id']}\n")
    print("| fault | injected | survived | rows lost | bytes differing (files) | leftovers | recover s | clean s | × clean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['recover_s'] / r['clean_s']:.2f}" if r["recover_s"] is not None else "–"
        print(f"| {r['fault']} | {r['injected']} | {r['survived']} | {r['rows_lost']} | {r['bytes_differing']} | "
              f"{r.get('leftovers', 0)} | {r['recover_s'] if r['recover_s'] is not None else '–'} | {r['clean_s']} | "
              f"{ratio} |")


if __name__ == "__main__":
    raise SystemExit(main())
