"""REPA speed-up: training steps (and CPU-seconds) to reach a fixed FD-CLIP with and without REPA.

Two flow-matching runs on the same DiT, data, seed and optimiser settings; the second adds REPA
(Yu et al. 2024: block ``--layer``'s tokens aligned through an MLP projector to the patch features
of the world's reference CLIP, the frozen encoder; weight 0.5).  Every ``--eval-every`` steps a
checkpoint is sampled (``--n-eval`` images from the same noise for every checkpoint, Euler
``--sample-steps``) and scored by FD on the reference CLIP's image embeddings against ``--n-ref``
images of the dataset (the evaluate stage's FD-CLIP extractor).  The target FD is the best the run
without REPA reaches at any checkpoint (or ``--target-fd``); the speed-up is

    steps to the target without REPA / steps to the target with REPA

(first checkpoint at or below it), and the same in training CPU-seconds (the training process's
CPU time, which includes REPA's encoder forwards).  The paper reports > 17.5x to the same FID on
ImageNet at 256 px with SiT-XL/2; this measures the tiny CPU case.

    nice -n 15 .venv/bin/python benchmarks/bench_repa.py [--data-root DIR] [--curate]
        [--steps 600] [--eval-every 100] [--layer 2] [--threads 1]

Prints the FD curve of both runs, the two ratios and one line of JSON.  The runs land in the run
registry (``<data root>/runs/<id>``), so a rerun with the same settings reuses them (their CPU time
is then read from ``<data root>/benchmarks/bench_repa/<run id>.json``, written when they ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.evaluate.fid import clip_image_extractor, fd_from_features  # noqa: E402
from imagegen.loader import make_dataset  # noqa: E402
from imagegen.paths import data_root, models_dir  # noqa: E402
from imagegen.registry import get_dataset  # noqa: E402
from imagegen.train.runs import TrainRequest, get_run, train_run  # noqa: E402
from models.checkpoint import load_family  # noqa: E402
from train_quality import ensure_dataset  # noqa: E402  (benchmarks/ is the script's folder)


def world_clip(root: Path, dataset: str) -> str:
    clip_id = get_dataset(root, dataset).card.get("stage_ids", {}).get("reference_clip")
    if not clip_id:
        raise SystemExit(f"dataset {dataset} was not curated from the world: it has no reference CLIP")
    return f"local-dir:{(models_dir(root) / 'reference_clip' / clip_id).resolve()}"


def features(extractor: torch.nn.Module, images: torch.Tensor, batch: int = 128) -> np.ndarray:
    """Images in [-1, 1] -> CLIP embeddings, through 8-bit pixels as a saved PNG would hold them."""
    out = []
    for i in range(0, len(images), batch):
        u8 = ((images[i:i + batch].clamp(-1, 1) + 1) * 127.5).round()
        out.append(extractor(u8).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def reference_features(extractor: torch.nn.Module, shards: list, size: int, n: int) -> np.ndarray:
    ims = []
    for s in make_dataset(shards, image_size=size, shuffle_buffer=0):
        ims.append(s["image"])
        if len(ims) == n:
            break
    return features(extractor, torch.stack(ims))


def request(args: argparse.Namespace, repa: bool) -> TrainRequest:
    model = {"net": "dit", "net_size": "tiny", "image_size": args.image_size, "conditioning": "none",
             "net_overrides": {"depth": args.depth, "hidden_size": args.hidden, "num_heads": args.heads,
                               "patch_size": args.patch}}
    if repa:
        model["repa"] = {"encoder": "world", "layer": args.layer, "weight": args.repa_weight,
                         "projector_dim": args.projector_dim}
    n_ckpt = args.steps // args.eval_every + 1
    return TrainRequest(dataset=args.dataset, train={
        "family": "flow", "model": model, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "warmup_steps": min(args.warmup, args.steps), "schedule": "constant", "ema_decay": args.ema,
        "ckpt_every": args.eval_every, "keep_checkpoints": n_ckpt, "log_every": 10, "epoch_batches": 100,
        "shuffle_buffer": 256, "sample_count": 4, "sample_steps": args.sample_steps, "seed": args.seed})


def fd_curve(run_dir: Path, extractor: torch.nn.Module, ref: np.ndarray, x_T: torch.Tensor,
             sample_steps: int) -> list[tuple[int, float]]:
    out = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        fam = load_family(ckpt)
        with torch.no_grad():
            x = torch.cat([fam.sample(len(chunk), sampler="euler", steps=sample_steps, x_T=chunk)
                           for chunk in x_T.split(64)])
        out.append((int(ckpt.name.removeprefix("step_")), fd_from_features(features(extractor, x), ref)))
    return out


def first_at_or_below(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, fd in curve if fd <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--dataset", default="world-smoke")
    ap.add_argument("--curate", action="store_true", help="curate the dataset (its preset) if it is missing")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--layer", type=int, default=2, help="REPA: the aligned block (1-based)")
    ap.add_argument("--repa-weight", type=float, default=0.5)
    ap.add_argument("--projector-dim", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=256, help="generated images per checkpoint")
    ap.add_argument("--n-ref", type=int, default=1000, help="reference images")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--target-fd", type=float, default=None, help="default: the best FD without REPA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = data_root(args.data_root)
    ensure_dataset(root, args.dataset, args.curate)
    ds = get_dataset(root, args.dataset)

    extractor = clip_image_extractor(world_clip(root, args.dataset))
    ref = reference_features(extractor, list(ds.shards), args.image_size, args.n_ref)
    x_T = torch.randn((args.n_eval, 3, args.image_size, args.image_size),
                      generator=torch.Generator().manual_seed(1234))
    runs = {}
    for label, repa in (("baseline", False), ("repa", True)):
        t0, c0 = time.perf_counter(), time.process_time()
        res = train_run(request(args, repa), root)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        record = root / "benchmarks" / "bench_repa" / f"{res['run_id']}.json"  # the CPU time, measured once
        if res["reused"]:
            cpu = float(json.loads(record.read_text())["train_cpu_s"]) if record.is_file() else float("nan")
        else:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"train_cpu_s": cpu, "threads": args.threads}))
        curve = fd_curve(Path(get_run(root, res["run_id"]).path), extractor, ref, x_T, args.sample_steps)
        runs[label] = {"run_id": res["run_id"], "reused": res["reused"], "train_cpu_s": round(cpu, 1),
                       "train_wall_s": round(wall, 1), "cpu_s_per_step": cpu / args.steps, "curve": curve,
                       "last_losses": res["last_losses"]}
        print(f"{label:8s} run {res['run_id']}{' (reused)' if res['reused'] else ''}: {args.steps} steps, "
              f"{cpu:.1f} CPU-s ({cpu / args.steps:.3f} per step), {wall:.1f} s wall", flush=True)

    base, rep = runs["baseline"], runs["repa"]
    # the best FD the run without REPA reaches (FD need not fall monotonically at small budgets)
    target = args.target_fd if args.target_fd is not None else min(fd for _, fd in base["curve"])
    print(f"\n| step | FD-CLIP without REPA | FD-CLIP with REPA (layer {args.layer}) |\n|---:|---:|---:|")
    for (s, a), (_, b) in zip(base["curve"], rep["curve"]):
        print(f"| {s} | {a:.2f} | {b:.2f} |")
    s_base, s_repa = first_at_or_below(base["curve"], target), first_at_or_below(rep["curve"], target)
    ratio = cpu_ratio = None
    if s_base is not None and s_repa is not None:
        ratio = s_base / s_repa
        cpu_ratio = (s_base * base["cpu_s_per_step"]) / (s_repa * rep["cpu_s_per_step"])
        print(f"\ntarget FD-CLIP {target:.2f}: {s_base} steps without REPA, {s_repa} with: {ratio:.2f}x fewer steps, "
              f"{cpu_ratio:.2f}x fewer CPU-s (REPA costs {rep['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}x per step)")
    else:
        print(f"\ntarget FD-CLIP {target:.2f}: without REPA at step {s_base}, with REPA "
              f"{'not reached within ' + str(args.steps) + ' steps' if s_repa is None else 'at step ' + str(s_repa)}")
    print(json.dumps({"target_fd": target, "steps_to_target": {"baseline": s_base, "repa": s_repa},
                      "speedup_steps": ratio, "speedup_cpu_s": cpu_ratio, "runs": runs, "args": vars(args),
                      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg()}, default=str))


if __name__ == "__main__":
    main()
