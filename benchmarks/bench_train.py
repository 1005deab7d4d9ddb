"""Trainer step rate vs a minimal hand-written PyTorch loop on the same model, batch and data (CPU).

Contender A is ``imagegen.train.train(cfg, shards, run_dir)``.  Contender B is the shortest loop
that does the same arithmetic: the same family built by ``models.registry.build_family`` after
``torch.manual_seed(seed)``, ``torch.optim.AdamW`` with the same hyper-parameters, the same
``make_loader`` call the trainer makes (resampled, same seed, batch, image size and workers) and,
per step, ``next(batch)``, ``family(batch, gen).losses["model"]``, ``zero_grad``, ``backward``,
``clip_grad_norm_``, ``step`` (plus a hand-written EMA ``lerp_`` when the trainer runs with EMA).
Both start from the same seeds, so both must end on the same loss: the "same loss" column checks
that they did the same work.  Goals: trainer >= 0.95x the loop; data wait < 5% of step time.

    .venv/bin/python benchmarks/bench_train.py [--family flow] [--net dit] [--steps 30] [--warmup 5]
        [--repeats 5] [--workers 0 1] [--ema 0.999] [--batch-size 32] [--n-images 512]

How time is measured, the same way for both: a global optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) stamps the end of every
``optimizer.step()``.  The rate is ``steps / (stamp[warmup + steps] - stamp[warmup])``: whole
steps only, without the warm-up steps, the family build, loader start-up or what the trainer
does after its last step (final checkpoint, sample grid, loss curve).  A forward pre-hook on
the family stamps the start of each forward; the "gap" is the time from the end of one
optimizer step to the next forward: waiting for the batch plus the per-step bookkeeping around
it (EMA, LR scheduler, metric row, zero_grad).  "data wait" is the trainer's own
``data_wait_s / elapsed_s`` over the whole run (it includes the first batch, i.e. loader and
worker start-up), and for the loop the time blocked in ``next()`` over the timed window.  Two
figures less sensitive to other jobs go with the rate: the median step time and this
process's CPU time per timed step (``time.process_time``, least over the rounds; worker
processes excluded), which grows with the work the step does rather than with time spent
descheduled (shared caches still inflate it somewhat on a busy machine).

Prints a table and one line of JSON.  Each figure is the best of ``--repeats`` rounds in which the
contenders take turns (so a burst of load elsewhere hits all of them).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.loader import make_loader  # noqa: E402
from imagegen.stages.shard import ShardConfig, write_shards  # noqa: E402
from imagegen.train import TrainConfig, train  # noqa: E402
from models.base import Family  # noqa: E402
from models.registry import build_family  # noqa: E402


# ------------------------------------------------------------------------------------------ data


def photo_like_jpeg(i: int, size: int) -> bytes:
    """A smooth random colour field plus grain, JPEG q90: realistic size and decode cost."""
    rng = np.random.default_rng(1000 + i)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    arr = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.int16)
    arr = arr + rng.integers(-10, 11, arr.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(out_dir: Path, n: int, size: int, per_shard: int) -> list[Path]:
    samples = ({"key": f"{i:06d}", "image": photo_like_jpeg(i, size), "ext": "jpg", "caption": f"image {i}"}
               for i in range(n))
    write_shards(samples, out_dir, ShardConfig(target_shard_size=per_shard))
    return sorted(out_dir.glob("*.tar"))


# ------------------------------------------------------------------------------------------ timing probes


@dataclass
class Probe:
    """Stamps of every optimizer step's end and of every family forward's start, for one run."""

    opt_ends: list[float] = field(default_factory=list)
    opt_ends_cpu: list[float] = field(default_factory=list)  # this process's CPU time (time.process_time)
    fwd_starts: list[float] = field(default_factory=list)
    active: bool = False

    def reset(self) -> None:
        self.opt_ends, self.opt_ends_cpu, self.fwd_starts, self.active = [], [], [], True

    def window(self, warmup: int, steps: int) -> tuple[float, float, float, float]:
        """(seconds from the end of step ``warmup`` to the end of step ``warmup + steps``, summed gaps
        before the forwards of those steps, median step seconds among them, this process's CPU
        seconds over the window); needs warmup >= 1."""
        if len(self.opt_ends) < warmup + steps or len(self.fwd_starts) < warmup + steps:
            raise RuntimeError(f"probe saw {len(self.opt_ends)} optimizer steps and {len(self.fwd_starts)} "
                               f"forwards, expected {warmup + steps}: was a step skipped (non-finite loss)?")
        seconds = self.opt_ends[warmup + steps - 1] - self.opt_ends[warmup - 1]
        gap = sum(self.fwd_starts[k] - self.opt_ends[k - 1] for k in range(warmup, warmup + steps))
        median = float(np.median(np.diff(self.opt_ends[warmup - 1:warmup + steps])))
        cpu = self.opt_ends_cpu[warmup + steps - 1] - self.opt_ends_cpu[warmup - 1]
        return seconds, gap, median, cpu


PROBE = Probe()


def _opt_post_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if PROBE.active:
        PROBE.opt_ends.append(time.perf_counter())
        PROBE.opt_ends_cpu.append(time.process_time())


def _fwd_pre_hook(module: nn.Module, args: Any) -> None:
    if PROBE.active:
        PROBE.fwd_starts.append(time.perf_counter())


def _catch_family(module: nn.Module, args: Any) -> None:
    """Global forward pre-hook, live only until the trainer's family makes its first call: then it
    moves to that instance (one hook on the outer module; the global one would tax every layer)."""
    global _CATCH
    if isinstance(module, Family) and _CATCH is not None:
        _CATCH.remove()
        _CATCH = None
        module.register_forward_pre_hook(_fwd_pre_hook)
        _fwd_pre_hook(module, args)


_CATCH: Any = None
register_optimizer_step_post_hook(_opt_post_hook)


@dataclass
class Result:
    steps_per_s: float
    gap_share: float  # (data wait + bookkeeping between optimizer step and next forward) / step time
    data_wait_share: float
    final_loss: float
    median_step_ms: float
    cpu_step_ms: float


# ------------------------------------------------------------------------------------------ contenders


def train_config(args: argparse.Namespace, workers: int, ema: float) -> TrainConfig:
    model: dict[str, Any] = {"net": args.net, "net_size": "tiny", "image_size": args.image_size}
    return TrainConfig(family=args.family, model=model, steps=args.warmup + args.steps, batch_size=args.batch_size,
                       lr=1e-4, grad_clip=1.0, ema_decay=ema, device="cpu", precision="fp32", seed=0, log_every=1,
                       ckpt_every=10**6, num_workers=workers)


def run_trainer(cfg: TrainConfig, shards: list[Path], tmp: Path, warmup: int, steps: int) -> Result:
    global _CATCH
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))  # fresh: an old checkpoint would be resumed
    PROBE.reset()
    _CATCH = nn.modules.module.register_module_forward_pre_hook(_catch_family)
    try:
        summary = train(cfg, shards, run_dir)
    finally:
        PROBE.active = False
        if _CATCH is not None:
            _CATCH.remove()
            _CATCH = None
    seconds, gap, median, cpu = PROBE.window(warmup, steps)
    return Result(steps / seconds, gap / seconds, summary["data_wait_s"] / summary["elapsed_s"],
                  float(summary["last_losses"]["model"]), 1000 * median, 1000 * cpu / steps)


def epochs(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_loop(cfg: TrainConfig, shards: list[Path], tmp: Path, warmup: int, steps: int) -> Result:
    """The minimal hand-written loop doing the trainer's arithmetic."""
    torch.manual_seed(cfg.seed)
    family = build_family(cfg.family, cfg.model)
    params = [p for p in family.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params] if cfg.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = make_loader(shards, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True,
                         image_size=cfg.model["image_size"], resampled=True,
                         epoch_samples=cfg.epoch_batches * cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                         seed=cfg.seed, rank=0, world_size=1)
    batches = epochs(loader)
    family.register_forward_pre_hook(_fwd_pre_hook)
    PROBE.reset()
    wait = 0.0
    loss = torch.tensor(float("nan"))
    try:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            batch = next(batches)
            if step >= warmup:
                wait += time.perf_counter() - t0
            loss = family(batch, gen).losses["model"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema, params):
                        e.lerp_(p, 1.0 - cfg.ema_decay)
    finally:
        PROBE.active = False
        batches.close()
    seconds, gap, median, cpu = PROBE.window(warmup, steps)
    return Result(steps / seconds, gap / seconds, wait / seconds, float(loss.detach()), 1000 * median,
                  1000 * cpu / steps)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="flow", help="registered family (ddpm, edm, flow)")
    ap.add_argument("--net", default="dit", choices=["dit", "unet"], help="tiny preset of this denoiser")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader workers settings")
    ap.add_argument("--ema", type=float, default=0.999,
                    help="also compare with EMA at this decay (first --workers setting); 0 = skip")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (workers always use 1)")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    logging.getLogger("imagegen").setLevel(logging.WARNING)

    settings = [(w, 0.0) for w in args.workers] + ([(args.workers[0], args.ema)] if args.ema > 0 else [])
    best: dict[tuple[str, int, float], Result] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = make_shards(tmp / "shards", args.n_images, args.image_size, per_shard=64)
        for _ in range(args.repeats):
            for w, ema in settings:
                cfg = train_config(args, w, ema)
                for name, fn in (("trainer", run_trainer), ("loop", run_loop)):
                    r = fn(cfg, shards, tmp, args.warmup, args.steps)
                    key = (name, w, ema)
                    if key in best:
                        r.cpu_step_ms = min(r.cpu_step_ms, best[key].cpu_step_ms)  # fewest CPU ms of any round
                    if key not in best or r.steps_per_s > best[key].steps_per_s:
                        best[key] = r
                    else:
                        best[key].cpu_step_ms = r.cpu_step_ms

    probe_model = build_family(args.family, {"net": args.net, "net_size": "tiny", "image_size": args.image_size})
    n_params = sum(p.numel() for p in probe_model.parameters())
    print(f"{args.family} + tiny {args.net} ({n_params / 1e6:.2f} M params), batch {args.batch_size} of "
          f"{args.image_size}x{args.image_size} JPEGs from {args.n_images} in {len(shards)} shards; {args.warmup} "
          f"warm-up + {args.steps} timed steps, best of {args.repeats}; {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} with {args.threads} thread(s), Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'contender':<10} {'workers':>7} {'ema':>6} {'steps/s':>8} {'x loop':>7} {'gap %':>6} "
          f"{'data wait %':>11} {'med ms':>7} {'cpu ms':>7} {'same loss':>9}")
    result: dict[str, Any] = {"bench": "train", "family": args.family, "net": args.net, "batch_size": args.batch_size,
                              "image_size": args.image_size, "steps": args.steps, "warmup": args.warmup,
                              "cpus": os.cpu_count(), "threads": args.threads, "goal_ratio": 0.95,
                              "goal_data_wait_share": 0.05}
    for w, ema in settings:
        loop, trainer = best[("loop", w, ema)], best[("trainer", w, ema)]
        same = trainer.final_loss == loop.final_loss
        for name, r in (("loop", loop), ("trainer", trainer)):
            print(f"{name:<10} {w:>7} {ema:>6g} {r.steps_per_s:>8.2f} {r.steps_per_s / loop.steps_per_s:>7.3f} "
                  f"{100 * r.gap_share:>6.1f} {100 * r.data_wait_share:>11.1f} {r.median_step_ms:>7.1f} "
                  f"{r.cpu_step_ms:>7.1f} {'yes' if same else 'NO':>9}")
        tag = f"w{w}" + (f"_ema{ema:g}" if ema else "")
        result[f"loop_{tag}_steps_per_s"] = round(loop.steps_per_s, 3)
        result[f"trainer_{tag}_steps_per_s"] = round(trainer.steps_per_s, 3)
        result[f"ratio_{tag}"] = round(trainer.steps_per_s / loop.steps_per_s, 3)
        result[f"trainer_{tag}_data_wait_share"] = round(trainer.data_wait_share, 4)
        result[f"trainer_{tag}_gap_share"] = round(trainer.gap_share, 4)
        result[f"loop_{tag}_data_wait_share"] = round(loop.data_wait_share, 4)
        result[f"loop_{tag}_median_step_ms"] = round(loop.median_step_ms, 2)
        result[f"trainer_{tag}_median_step_ms"] = round(trainer.median_step_ms, 2)
        result[f"loop_{tag}_cpu_step_ms"] = round(loop.cpu_step_ms, 2)
        result[f"trainer_{tag}_cpu_step_ms"] = round(trainer.cpu_step_ms, 2)
        result[f"same_loss_{tag}"] = same
    print("steps/s and x loop: timed window, best round; gap %: end of optimizer.step() to the next forward "
          "(batch wait + per-step bookkeeping), share of step time; data wait %: trainer = its data_wait_s / "
          "elapsed_s over the whole run, loop = time in next() over the timed steps; med ms: median step of the "
          "best round (robust to bursts of load elsewhere, blind to costs paid every k-th step); cpu ms: CPU time of "
          "this process per timed step, least of the rounds (worker processes excluded)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
