"""Train every family at the same fixed CPU budget on the embedded world, evaluate it, leaderboard.

Budget: each family gets the same number of CPU-seconds of training (``--budget-cpu-s``; the
training process's CPU time, torch on ``--threads`` threads, data decoded in-process with
``num_workers=0`` so decoding is counted).  A short probe of each family (its own network, batch
and data, outside the registry) measures CPU-seconds per step; the run then trains
``budget / (CPU-s per step)`` steps, so cheap steps (GAN, VAE) get more of them.  Measuring CPU
time rather than wall time keeps the budget the same when other jobs share the machine.  Pass
``--steps-for family=N`` to repeat an earlier table exactly (the JSON line lists the steps).

Families: the diffusion/flow families (ddpm, edm, flow, ict = consistency training) on the
preset's network; vae, gan, kl_autoencoder, vq, vqgan, vq_lfq (vq with LFQ) and msvq (VAR's
multi-scale tokenizer) with their own CPU-sized networks; latent_flow (a tiny DiT flow on the
latents of the kl_autoencoder run), latent_mmdit (the same with the MMDiT backbone),
latent_flow_repa (latent_flow with REPA on the world's reference CLIP), maskgit and ar (on the
tokens of the vq run) and var (on the token maps of the msvq run), whose first stage is that
family's row (its budget is not charged twice; the table says so); dmd, distilled from the flow
row's run on 512 of its (noise, 20-step Euler sample) pairs (drawing the pairs is not charged
either; the JSON names the teacher).  Every run is
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
from imagegen.distill import reflow_pairs  # noqa: E402
from imagegen.train.runs import TRAIN_PRESETS, TrainRequest, get_run, prepare, train_run  # noqa: E402
from imagegen.train.trainer import TrainConfig, train  # noqa: E402

# Families that are not denoisers bring their own network settings (small, CPU-sized).
OWN_MODEL: dict[str, dict] = {
    "vae": {"width": 32, "latent_channels": 4, "levels": 2},
    "gan": {"width": 32, "latent_dim": 64, "levels": 2},
    "kl_autoencoder": {"width": 32, "latent_channels": 4, "levels": 2},
    "vq": {"width": 32, "codebook_size": 256, "code_dim": 8, "levels": 2},
    "vqgan": {"width": 32, "codebook_size": 256, "code_dim": 8, "levels": 2},
    "vq_lfq": {"width": 32, "quantizer": "lfq", "lfq_bits": 8, "levels": 2},
    "msvq": {"width": 32, "codebook_size": 256, "code_dim": 8, "levels": 2},
}
# Leaderboard rows that are a registered family with other settings.
ROW_FAMILY = {"vq_lfq": "vq", "latent_flow": "flow", "latent_mmdit": "flow", "latent_flow_repa": "flow"}
# Rows distilled from another row's run (their teacher; the pairs dataset is drawn from it, not charged).
TEACHER = {"dmd": "flow"}
DMD_PAIRS, DMD_PAIR_STEPS = 512, 20


def msvq_scales(side: int) -> list[int]:
    """VAR-style scales for a latent side: 1, 2, 3, 4, 6, 8, ... below it, then the side itself."""
    return [s for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48) if s < side] + [side]


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


FIRST_STAGE = {"latent_flow": "kl_autoencoder", "latent_mmdit": "kl_autoencoder",
               "latent_flow_repa": "kl_autoencoder", "maskgit": "vq", "ar": "vq", "var": "msvq"}
DEFAULT_FAMILIES = ("ddpm,edm,flow,vae,gan,kl_autoencoder,latent_flow,vq,maskgit,vqgan,vq_lfq,ar,msvq,var,"
                    "latent_mmdit,latent_flow_repa,ict,dmd")


def family_request(base: TrainRequest, family: str, dataset: str | None = None, teacher: str | None = None) -> dict:
    """The preset's request with ``family`` swapped in (and, for latent families, ``dataset``; for a
    distilled row, the teacher run and its pairs ``dataset``)."""
    data = base.model_dump(mode="json")
    data["train"].update(family=ROW_FAMILY.get(family, family), num_workers=0)
    size = data["train"]["model"].get("image_size", 32)
    cond = data["train"]["model"].get("conditioning", "none")
    if family in OWN_MODEL:  # not a denoiser: its own network settings, same budget and data
        data["train"]["model"] = {"image_size": size, **OWN_MODEL[family]}
        if family == "msvq":
            data["train"]["model"]["scales"] = msvq_scales(size // 4)
        for k in ("label_keywords", "label_field", "classes", "sample_prompts"):
            data["train"].pop(k, None)
        data["train"]["sample_guidance"] = 1.0
        data["train"]["sample_steps"] = None
    if family in FIRST_STAGE:
        data["dataset"] = dataset
        model = {"conditioning": cond, **({"text_encoder": data["train"]["model"]["text_encoder"]}
                                          if cond == "text" else {})}
        if family in ("latent_flow", "latent_mmdit", "latent_flow_repa"):
            model.update(data="latents", net="mmdit" if family == "latent_mmdit" else "dit", net_size="tiny",
                         net_overrides={"patch_size": 2})
            if family == "latent_flow_repa":  # the world's reference CLIP as the aligned encoder
                model["repa"] = {"encoder": "world", "layer": 1, "projector_dim": 256}
        else:
            model.update(hidden=128, depth=4, heads=4)
            if family in ("ar", "var"):
                data["train"]["sample_steps"] = None  # one step per token / per scale
        data["train"]["model"] = model
    if family in TEACHER:  # a student of the teacher row's run, on its (noise, sample) pairs
        data["dataset"] = dataset
        model = {**data["train"]["model"], "teacher": f"run:{teacher}"}
        if cond != "none":
            model["real_guidance"] = data["train"].get("sample_guidance", 1.0)
        data["train"]["model"] = model
        data["train"].update(sample_steps=1, sample_guidance=1.0)
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
        dataset = teacher = None
        if family in FIRST_STAGE:
            first = FIRST_STAGE[family]
            if first not in runs:
                run_family(first)
            if first not in latent_sets:
                latent_sets[first] = encode_dataset(root, base.dataset, runs[first])
            dataset = latent_sets[first]
        if family in TEACHER:
            if TEACHER[family] not in runs:
                run_family(TEACHER[family])
            teacher = runs[TEACHER[family]]
            tcfg = TrainConfig(**get_run(root, teacher).card["config"])
            guidance = tcfg.sample_guidance if tcfg.model.get("conditioning", "none") != "none" else 1.0
            dataset = reflow_pairs(root, teacher, tcfg, DMD_PAIRS, DMD_PAIR_STEPS, "euler", guidance, seed=0)
        data = family_request(base, family, dataset, teacher)
        per_step = None if family in fixed else cpu_per_step(data, root, args.probe_cpu_s)
        steps = fixed[family] if per_step is None else max(1, round(args.budget_cpu_s / per_step))
        data["train"]["steps"] = steps
        if data["train"]["family"] == "ict":  # the discretisation curriculum spans the run
            data["train"]["model"]["curriculum_steps"] = steps
        if data["train"]["family"] == "vqgan":  # the discriminator joins after the first quarter
            data["train"]["model"]["disc_start"] = steps // 4
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
               "first_stage": runs.get(FIRST_STAGE.get(family, ""), None), "teacher": teacher,
               "final_losses": res["last_losses"],
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
