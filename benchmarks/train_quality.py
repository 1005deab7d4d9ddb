"""Train every family at the same fixed budget on the embedded world, evaluate it, leaderboard.

Each family trains for the same number of steps at the same global batch on the same curated
dataset: the diffusion/flow families (ddpm, edm, flow) on the preset's network; vae and gan with
their own CPU-sized networks; latent_flow (a DiT flow on the latents of a KL autoencoder run) and
maskgit (on the tokens of a VQ run) after their first stage is trained and the dataset encoded.
Every run is then evaluated with the same settings (FD on the reference CLIP, KID, CLIPScore for
conditional ones) and a leaderboard is written.  The
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
from imagegen.evaluate.run import evaluate  # noqa: E402
from imagegen.latents import encode_dataset  # noqa: E402
from imagegen.leaderboard import leaderboard, write_leaderboard  # noqa: E402
from imagegen.train.runs import TRAIN_PRESETS, TrainRequest, train_run  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo", choices=sorted(TRAIN_PRESETS))
    ap.add_argument("--steps", type=int, default=None, help="steps per family (default: the preset's)")
    ap.add_argument("--families", default="ddpm,edm,flow,vae,gan,latent_flow,maskgit")
    ap.add_argument("--n-eval", type=int, default=500, help="images generated per family for the metrics")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more request overrides")
    ap.add_argument("--curate", action="store_true", help="curate the preset's dataset if it is missing")
    args = ap.parse_args()

    root = data_root(args.data_root)
    rows: list[dict] = []
    evals: list[dict] = []
    latent_sets: dict[str, str] = {}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
        base = build_config(TrainRequest, TRAIN_PRESETS, args.preset, overrides)  # the preset's own family
        ensure_dataset(root, base.dataset, args.curate)
        data = base.model_dump(mode="json")
        data["train"]["family"] = family
        size = data["train"]["model"].get("image_size", 32)
        cond = data["train"]["model"].get("conditioning", "none")
        if family in OWN_MODEL:  # not a denoiser: its own network settings, same budget and data
            data["train"]["model"] = {"image_size": size, **OWN_MODEL[family]}
            for k in ("label_keywords", "label_field", "classes", "sample_prompts"):
                data["train"].pop(k, None)
            data["train"]["sample_guidance"] = 1.0
            data["train"]["sample_steps"] = None
        if family in ("latent_flow", "maskgit"):  # on a dataset encoded once by a first-stage run
            first = "kl_autoencoder" if family == "latent_flow" else "vq"
            if first not in latent_sets:
                fs = {**data, "train": {**data["train"], "family": first,
                                        "model": {"image_size": size, **OWN_MODEL[first]}}}
                fs["train"].update(sample_guidance=1.0, sample_steps=None)
                for k in ("label_keywords", "label_field", "classes", "sample_prompts"):
                    fs["train"].pop(k, None)
                ae = train_run(TrainRequest(**fs), root)["run_id"]
                latent_sets[first] = encode_dataset(root, base.dataset, ae)
            data["dataset"] = latent_sets[first]
            model = {"conditioning": cond, **({"text_encoder": data["train"]["model"]["text_encoder"]}
                                              if cond == "text" else {})}
            if family == "latent_flow":
                data["train"]["family"] = "flow"
                model.update(data="latents", net="dit", net_size="tiny", net_overrides={"patch_size": 2})
            else:
                model.update(hidden=128, depth=4, heads=4)
            data["train"]["model"] = model
        req = TrainRequest(**data)
        t0 = time.perf_counter()
        res = train_run(req, root)
        ev = evaluate({"run": res["run_id"], "reference": base.dataset, "n_samples": args.n_eval,
                       "metrics": ["fid", "kid", "clipscore"] if cond != "none" else ["fid", "kid"]}, root)
        evals.append(ev)
        rows.append({"family": family, "run_id": res["run_id"], "reused": res["reused"],
                     "seconds": round(time.perf_counter() - t0, 1), "steps": res["step"],
                     "steps_per_s": res.get("steps_per_s"), "final_losses": res["last_losses"],
                     "grid": res["samples"][-1] if res.get("samples") else None,
                     "checkpoint": res["checkpoint"], "metrics": ev["metrics"]})
        r = rows[-1]
        print(f"{family:14s} {r['seconds']:8.1f} s  {r['steps']:6d} steps  run {r['run_id']}"
              f"{' (reused)' if r['reused'] else ''}  {ev['metrics']}", flush=True)
    board = write_leaderboard(leaderboard(root, evals), Path(root) / "leaderboards" / f"quality-{args.preset}")
    print(f"leaderboard: {board}")
    print(json.dumps({"preset": args.preset, "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "runs": rows, "leaderboard": board}, default=str))


if __name__ == "__main__":
    main()
