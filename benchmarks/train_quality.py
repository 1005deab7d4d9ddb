"""Train every family at the same fixed CPU budget on the embedded world, evaluate it, leaderboard.

Budget: each family gets the same number of CPU-seconds of training (``--budget-cpu-s``; the
training process's CPU time, torch on ``--threads`` threads, data decoded in-process with
``num_workers=0`` so decoding is counted).  A short probe of each family (its own network, batch
and data, outside the registry) measures CPU-seconds per step; the run then trains
``budget / (CPU-s per step)`` steps, so cheap steps (GAN, VAE) get more of them.  Measuring CPU
time rather than wall time keeps the budget the same when other jobs share the machine.  Pass
``--steps-for family=N`` to repeat an earlier table exactly (the JSON line lists the steps).

Families: the diffusion/flow families (ddpm, edm, flow) on the preset's network; vae, gan,
kl_autoencoder and vq with their own CPU-sized networks; latent_flow (a tiny DiT flow on the
latents of the kl_autoencoder run) and maskgit (on the tokens of the vq run), whose first stage
is that family's row (its budget is not charged twice; the table says so).  Every run is
evaluated with the same settings (FD on the reference CLIP, KID, CLIPScore for conditional ones)
and a leaderboard is written.  The runs land in the run registry (``<data root>/runs/<id>``), so
reruns reuse finished runs.

    .venv/bin/python benchmarks/train_quality.py [--preset smoke] [--budget-cpu-s 180]
        [--families ddpm,edm,flow,...] [--data-root DIR] [--curate]

Prints one row per family (steps, CPU-s, wall s, final losses, metrics) and one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.paths import data_root  # noqa: E402
from imagegen.presets import build_config  # noqa: E402
from imagegen.registry import RegistryError, get_dataset  # noqa: E402
from imagegen.evaluate.run import evaluate  # noqa: E402
from imagegen.latents import encode_dataset  # noqa: E402
from imagegen.leaderboard import leaderboard, write_leaderboard  # noqa: E402
from imagegen.train.runs import TRAIN_PRESETS, TrainRequest, prepare, train_run  # noqa: E402
from imagegen.train.trainer import train  # noqa: E402

# Families that are not denoisers bring their own network settings (small, CPU-sized).
OWN_MODEL: dict[str, dict] = {
    "vae": {"width": 32, "latent_channels": 4, "levels": 2},
    "gan": {"width": 32, "latent_dim": 64, "levels": 2},
    "kl_autoencoder": {"width": 32, "latent_channels": 4, "levels": 2},
    "vq": {"width": 32, "codebook_size": 256, "code_dim": 8, "levels": 2},
}


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


FIRST_STAGE = {"latent_flow": "kl_autoencoder", "maskgit": "vq"}
DEFAULT_FAMILIES = "ddpm,edm,flow,vae,gan,kl_autoencoder,latent_flow,vq,maskgit"


def family_request(base: TrainRequest, family: str, dataset: str | None = None) -> dict:
    """The preset's request with ``family`` swapped in (and, for latent families, ``dataset``)."""
    data = base.model_dump(mode="json")
    data["train"].update(family=family, num_workers=0)
    size = data["train"]["model"].get("image_size", 32)
    cond = data["train"]["model"].get("conditioning", "none")
    if family in OWN_MODEL:  # not a denoiser: its own network settings, same budget and data
        data["train"]["model"] = {"image_size": size, **OWN_MODEL[family]}
        for k in ("label_keywords", "label_field", "classes", "sample_prompts"):
            data["train"].pop(k, None)
        data["train"]["sample_guidance"] = 1.0
        data["train"]["sample_steps"] = None
    if family in FIRST_STAGE:
        data["dataset"] = dataset
        model = {"conditioning": cond, **({"text_encoder": data["train"]["model"]["text_encoder"]}
                                          if cond == "text" else {})}
        if family == "latent_flow":
            data["train"]["family"] = "flow"
            model.update(data="latents", net="dit", net_size="tiny", net_overrides={"patch_size": 2})
        else:
            model.update(hidden=128, depth=4, heads=4)
        data["train"]["model"] = model
    # keep only the model fields the new family accepts (the preset's own family may have others)
    from models.registry import get_family

    fields = get_family(data["train"]["family"]).Config.model_fields
    data["train"]["model"] = {k: v for k, v in data["train"]["model"].items() if k in fields}
    return data


class _ProbeDone(Exception):
    pass


def cpu_per_step(data: dict, root: Path, probe_cpu_s: float) -> float:
    """CPU-seconds per training step of this request, measured over ``probe_cpu_s`` of training
    after the first progress report (start-up and the first steps excluded)."""
    probe = dict(data, train={**data["train"], "steps": 10**6, "sample_every": 0, "ckpt_every": 10**6})
    prep = prepare(TrainRequest(**probe), root)
    marks: list[tuple[int, float]] = []

    def progress(info: dict) -> None:
        marks.append((int(info["step"]), time.process_time()))
        if len(marks) >= 2 and marks[-1][1] - marks[0][1] >= probe_cpu_s and marks[-1][0] > marks[0][0]:
            raise _ProbeDone

    with tempfile.TemporaryDirectory(prefix="quality-probe-") as tmp:
        try:
            train(prep.resolved, prep.dataset.shards, tmp, progress=progress)
        except _ProbeDone:
            pass
    (s0, c0), (s1, c1) = marks[0], marks[-1]
    return (c1 - c0) / (s1 - s0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smoke", choices=sorted(TRAIN_PRESETS))
    ap.add_argument("--budget-cpu-s", type=float, default=180.0, help="training CPU-seconds per family")
    ap.add_argument("--probe-cpu-s", type=float, default=8.0, help="CPU-seconds of each family's speed probe")
    ap.add_argument("--steps-for", action="append", default=[], metavar="FAMILY=N",
                    help="train FAMILY for N steps instead of the budget's (to repeat a table)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--families", default=DEFAULT_FAMILIES)
    ap.add_argument("--n-eval", type=int, default=500, help="images generated per family for the metrics")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more request overrides")
    ap.add_argument("--curate", action="store_true", help="curate the preset's dataset if it is missing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fixed = {k: int(v) for k, v in (x.split("=", 1) for x in args.steps_for)}

    root = data_root(args.data_root)
    base = build_config(TrainRequest, TRAIN_PRESETS, args.preset, list(args.set))
    ensure_dataset(root, base.dataset, args.curate)
    rows: list[dict] = []
    evals: list[dict] = []
    runs: dict[str, str] = {}  # family -> run id
    latent_sets: dict[str, str] = {}

    def run_family(family: str) -> dict:
        dataset = None
        if family in FIRST_STAGE:
            first = FIRST_STAGE[family]
            if first not in runs:
                run_family(first)
            if first not in latent_sets:
                latent_sets[first] = encode_dataset(root, base.dataset, runs[first])
            dataset = latent_sets[first]
        data = family_request(base, family, dataset)
        per_step = None if family in fixed else cpu_per_step(data, root, args.probe_cpu_s)
        steps = fixed[family] if per_step is None else max(1, round(args.budget_cpu_s / per_step))
        data["train"]["steps"] = steps
        data["train"]["warmup_steps"] = min(data["train"].get("warmup_steps", 0), max(1, steps // 10))
        data["train"]["ckpt_every"] = steps
        req = TrainRequest(**data)
        t0, c0 = time.perf_counter(), time.process_time()
        res = train_run(req, root)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs[family] = res["run_id"]
        cond = req.train.model.get("conditioning", "none") if isinstance(req.train.model, dict) else "none"
        ev = evaluate({"run": res["run_id"], "reference": base.dataset, "n_samples": args.n_eval,
                       "metrics": ["fid", "kid", "clipscore"] if cond not in (None, "none") else ["fid", "kid"]}, root)
        evals.append(ev)
        row = {"family": family, "run_id": res["run_id"], "reused": res["reused"], "steps": res["step"],
               "probe_cpu_s_per_step": round(per_step, 4) if per_step else None, "train_cpu_s": round(cpu, 1), "train_wall_s": round(wall, 1),
               "first_stage": runs.get(FIRST_STAGE.get(family, ""), None), "final_losses": res["last_losses"],
               "grid": res["samples"][-1] if res.get("samples") else None, "checkpoint": res["checkpoint"],
               "metrics": ev["metrics"]}
        rows.append(row)
        print(f"{family:14s} {row['steps']:6d} steps  {row['train_cpu_s']:7.1f} CPU-s {row['train_wall_s']:7.1f} s  "
              f"run {row['run_id']}{' (reused)' if row['reused'] else ''}  {ev['metrics']}", flush=True)
        return row

    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family not in runs:
            run_family(family)
    board = write_leaderboard(leaderboard(root, evals), Path(root) / "leaderboards" / f"quality-{args.preset}")
    print(f"leaderboard: {board}")
    print(json.dumps({"preset": args.preset, "budget_cpu_s": args.budget_cpu_s, "threads": args.threads,
                      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg(), "runs": rows, "leaderboard": board,
                      "steps_for": [f"{r['family']}={r['steps']}" for r in rows]}, default=str))


if __name__ == "__main__":
    main()
