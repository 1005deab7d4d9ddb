"""Train every built-in family at the same fixed budget on the embedded world, for evaluation.

Each family (ddpm, edm, flow) trains the same network (the preset's) for the same number of
steps at the same global batch, i.e. the same training FLOPs, on the same curated dataset.  The
runs land in the run registry (``<data root>/runs/<id>``: checkpoints with EMA weights, sample
grids, loss curve, metrics), so the evaluate stage can score them by run id.  Reruns reuse
finished runs.

    .venv/bin/python benchmarks/train_quality.py [--preset demo] [--steps 3000] [--families ddpm,edm,flow]
        [--data-root DIR] [--curate]   # --curate: curate the preset's dataset first if it is missing

Prints one row per family (seconds, steps/s, final loss, run id, grid) and one line of JSON.
Defaults: the demo preset (text-conditioned tiny U-Net, 32 px, batch 64) for 3000 steps, about
an hour per family on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.paths import data_root  # noqa: E402
from imagegen.presets import build_config  # noqa: E402
from imagegen.registry import RegistryError, get_dataset  # noqa: E402
from imagegen.train.runs import TRAIN_PRESETS, TrainRequest, train_run  # noqa: E402


def ensure_dataset(root: Path, name: str, curate: bool) -> None:
    try:
        get_dataset(root, name)
    except RegistryError:
        if not curate:
            raise SystemExit(f"dataset {name!r} is not in the registry at {root}; run `imagegen curate --preset "
                             f"{name.removeprefix('world-')} --data-root {root}` first, or pass --curate")
        from imagegen.curate import CurateConfig, curate
        from imagegen.presets import CURATE_PRESETS

        preset = name.removeprefix("world-")
        curate(build_config(CurateConfig, CURATE_PRESETS, preset), root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo", choices=sorted(TRAIN_PRESETS))
    ap.add_argument("--steps", type=int, default=None, help="steps per family (default: the preset's)")
    ap.add_argument("--families", default="ddpm,edm,flow")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more request overrides")
    ap.add_argument("--curate", action="store_true", help="curate the preset's dataset if it is missing")
    args = ap.parse_args()

    root = data_root(args.data_root)
    rows = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        overrides = [f"train.family={family}", *args.set]
        if args.steps is not None:
            overrides.append(f"train.steps={args.steps}")
        req = build_config(TrainRequest, TRAIN_PRESETS, args.preset, overrides)
        ensure_dataset(root, req.dataset, args.curate)
        t0 = time.perf_counter()
        res = train_run(req, root)
        rows.append({"family": family, "run_id": res["run_id"], "reused": res["reused"],
                     "seconds": round(time.perf_counter() - t0, 1), "steps": res["step"],
                     "steps_per_s": res.get("steps_per_s"), "final_loss": res["last_losses"].get("model"),
                     "grid": res["samples"][-1] if res.get("samples") else None,
                     "checkpoint": res["checkpoint"]})
        r = rows[-1]
        print(f"{family:6s} {r['seconds']:8.1f} s  {r['steps']:6d} steps  loss {r['final_loss']:.4f}  "
              f"run {r['run_id']}{' (reused)' if r['reused'] else ''}  grid {r['grid']}", flush=True)
    print(json.dumps({"preset": args.preset, "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "runs": rows}))


if __name__ == "__main__":
    main()
