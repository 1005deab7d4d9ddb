"""The generic trainer: one loop for every model family (models/base.py contract).

Per step: ``family(batch, generator)`` (= loss) under optional bf16 autocast (CUDA only);
non-finite losses or gradient norms skip the step (counted, abort after ``max_bad_steps``);
each loss is backpropagated into its own optimizer's parameters, gradients clipped per
optimizer, every AdamW steps, LR schedulers (warmup then cosine/constant) step, EMA updates.

Exact resume.  Data come from the loader in resampled mode with a fixed seed; an "epoch" is
``epoch_batches`` batches and its order is a function of (seed, epoch) alone.  The data
position is (epoch, batches consumed in it); on resume the trainer calls ``set_epoch(epoch)``
and skips the consumed batches (they are decoded and thrown away: exact but costs up to one
epoch of reading; with the same ``num_workers`` the batch order is the same).  Weights,
optimizer moments, scheduler, EMA and all RNG states come from the checkpoint, so on CPU a
resumed run repeats the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from imagegen.artifacts import write_json_atomic
from imagegen.loader import make_loader
from imagegen.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, read_checkpoint,
                                       save_checkpoint)
from imagegen.train.ema import EMA
from models.base import Family, check_optimizers_spec
from models.registry import build_family, get_family

log = logging.getLogger(__name__)

METRICS = "metrics.parquet"
# Fields that may change between a run and its resumption without changing the trajectory.
RESUMABLE_CHANGES = ("log_every", "ckpt_every", "keep_checkpoints", "sample_every", "sample_count",
                     "sample_steps", "max_bad_steps", "device")


class TrainingDiverged(FloatingPointError):
    """Too many steps with a non-finite loss or gradient."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = Field(description="Registered model family name (models/registry.py)")
    model: dict[str, Any] = Field(default_factory=dict, description="The family's config fields")
    steps: int = Field(ge=1, le=100_000_000, description="Total optimizer steps of the run")
    batch_size: int = Field(ge=1, le=65_536, description="Samples per step (per process)")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Peak learning rate of every AdamW")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0.0, le=1.0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="AdamW decoupled weight decay")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warmup from lr/warmup_steps to lr")
    schedule: Literal["cosine", "constant"] = Field("constant", description="LR after warmup")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm per optimizer (0 = no clipping)")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="EMA decay of the weights (0 = no EMA)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (CUDA only; CPU runs fp32)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    seed: int = Field(0, ge=0, le=2**62, description="Seeds weights, data order and loss noise")
    log_every: int = Field(1, ge=1, description="Steps between metric rows (skipped steps always logged)")
    ckpt_every: int = Field(1000, ge=1, description="Steps between checkpoints (and at the end)")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Newest checkpoints kept")
    sample_every: int = Field(0, ge=0, description="Steps between sample grids (0 = never)")
    sample_count: int = Field(4, ge=1, le=256, description="Images per sample grid")
    sample_steps: int | None = Field(None, ge=1, le=10_000, description="Sampler steps (None = family default)")
    max_bad_steps: int = Field(10, ge=0, description="Non-finite steps tolerated (skipped) before aborting")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader workers")
    epoch_batches: int = Field(1000, ge=1, description="Batches per data epoch (the resampling unit)")
    shuffle_buffer: int = Field(1000, ge=0, description="Sample shuffle buffer of the loader")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must each lie in [0, 1), got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _normalise_model(cls, data: Any) -> Any:
        # the family config in canonical form, so checkpoints compare like with like
        if isinstance(data, dict) and isinstance(data.get("family"), str):
            fam = get_family(data["family"])  # UnknownFamilyError is a ValueError: reported by pydantic
            model = data.get("model", {})
            if not isinstance(model, dict):
                raise ValueError(f"model must be a dict of {fam.Config.__name__} fields, got {type(model).__name__}")
            data = {**data, "model": fam.Config(**model).model_dump(mode="json")}
        return data

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        return self


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """LR multiplier for the update at (0-based) ``step``: linear warmup, then cosine to 0 or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device='cuda' but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


# ------------------------------------------------------------------------------------------ data


def batch_stream(cfg: TrainConfig, shards: Sequence[str | Path], image_size: int, epoch: int,
                 skip: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(epoch, batches consumed in that epoch after this one, batch), from data position (epoch, skip)."""
    loader = make_loader(shards, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True,
                         image_size=image_size, resampled=True, epoch_samples=cfg.epoch_batches * cfg.batch_size,
                         shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed % 2**62, rank=0, world_size=1)
    while True:
        loader.dataset.set_epoch(epoch)
        seen = 0
        for batch in loader:
            seen += 1
            if seen > skip:
                yield epoch, seen, batch
        if seen == 0:
            raise RuntimeError(f"data epoch {epoch} yielded no full batch of {cfg.batch_size} from {len(shards)} "
                               "shard(s); are the shards readable and batch_size not larger than the data?")
        epoch, skip = epoch + 1, 0


# ------------------------------------------------------------------------------------------ metrics


class MetricsLog:
    """Rows buffered in memory, flushed by rewriting metrics.parquet atomically (tmp + rename).

    Rewriting costs O(rows) per flush; rows are few (one per ``log_every`` steps) and flushes
    happen at checkpoints.  On resume rows after the checkpoint step (logged by the killed run
    after its last checkpoint) are dropped, so the file holds one trajectory."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            old = pd.read_parquet(path)
            self.rows = old[old["step"] <= resume_step].to_dict("records")

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if not self.rows:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        pd.DataFrame(self.rows).to_parquet(tmp, index=False)
        tmp.replace(self.path)


# ------------------------------------------------------------------------------------------ sampling


def sample_images(family: Family, ema: EMA | None, n: int, seed: int, steps: int | None = None) -> Tensor:
    """n samples with the EMA weights swapped in (raw weights when EMA is off); the live weights
    are restored afterwards.  A dedicated generator leaves the training RNG streams alone."""
    gen = torch.Generator().manual_seed(seed)
    ctx = ema.swap_in(family) if ema is not None else nullcontext(family)
    with ctx:
        return family.sample(n, steps=steps, generator=gen).float().cpu()


def save_grid(images: Tensor, path: Path) -> None:
    """[-1, 1] images -> one PNG row (uint8 = round((x + 1) * 127.5))."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [n, C, H, W]
    row = torch.cat(list(x), dim=2).permute(1, 2, 0).numpy()  # [H, n*W, C]
    if row.shape[2] == 1:
        row = row[:, :, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(row)).save(tmp, format="PNG")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ train


def build(cfg: TrainConfig, device: torch.device) -> tuple[Family, dict[str, torch.optim.Optimizer],
                                                           dict[str, Any], EMA | None]:
    """Family (seeded), one AdamW + LambdaLR per optimizers_spec() entry, EMA (or None)."""
    torch.manual_seed(cfg.seed)
    family = build_family(cfg.family, cfg.model).to(device)
    spec = check_optimizers_spec(family)
    optimizers = {name: torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                          weight_decay=cfg.weight_decay) for name, params in spec.items()}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
                  for name, opt in optimizers.items()}
    ema = EMA(family, cfg.ema_decay) if cfg.ema_decay > 0 else None
    return family, optimizers, schedulers, ema


def train(cfg: TrainConfig | dict[str, Any], shards: Sequence[str | Path], run_dir: str | Path, *,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume, when ``run_dir`` holds a checkpoint) up to ``cfg.steps``.

    ``stop_after``: return after that many steps of this call without a final checkpoint, as a
    killed process would (for tests).  Returns a summary dict."""
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig(**cfg)
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 0):
        raise ValueError(f"stop_after must be an int >= 0 or None, got {stop_after!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg)
    bf16 = cfg.precision == "bf16" and device.type == "cuda"
    if cfg.precision == "bf16" and not bf16:
        warnings.warn("precision='bf16' applies on CUDA only; this CPU run uses fp32", stacklevel=2)
    family, optimizers, schedulers, ema = build(cfg, device)
    if family.cfg.data != "pixels" or family.cfg.channels != 3:
        raise ValueError(f"train: the shard loader yields RGB pixels; family config has data={family.cfg.data!r}, "
                         f"channels={family.cfg.channels} (latent training needs a latent loader, not built)")
    generator = torch.Generator().manual_seed(cfg.seed)
    cfg_json = cfg.model_dump(mode="json")

    step, epoch, skip, bad_steps = 0, 0, 0, 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        may_differ = RESUMABLE_CHANGES + (("steps",) if cfg.schedule == "constant" else ())
        meta = load_checkpoint(ckpt, family=family, optimizers=optimizers, schedulers=schedulers, ema=ema,
                               config=cfg_json, generator=generator, may_differ=may_differ)
        step = int(meta["step"])
        st = meta["trainer"]
        epoch, skip, bad_steps = int(st["epoch"]), int(st["batch_in_epoch"]), int(st["bad_steps"])
        log.info("resumed from %s (step %d)", ckpt, step)
    write_json_atomic(run_dir / "config.json", cfg_json)
    start_step = step
    metrics = MetricsLog(run_dir / METRICS, step)
    spec = check_optimizers_spec(family)
    names = list(spec)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    data = batch_stream(cfg, shards, family.cfg.image_size, epoch, skip)
    last_ckpt: Path | None = ckpt
    samples: list[str] = []
    last_losses: dict[str, float] = {}

    def checkpoint() -> Path:
        metrics.flush()
        return save_checkpoint(run_dir, step, family=family, optimizers=optimizers, schedulers=schedulers, ema=ema,
                               config=cfg_json, generator=generator, keep=cfg.keep_checkpoints,
                               trainer_state={"epoch": epoch, "batch_in_epoch": skip, "bad_steps": bad_steps})

    family.train()
    t0 = time.perf_counter()
    while step < cfg.steps and (stop_after is None or step - start_step < stop_after):
        epoch, skip, batch = next(data)
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with autocast:
            out = family(batch, generator)
        if set(out.losses) != set(names):
            raise ValueError(f"{type(family).__name__}.loss returned losses {sorted(out.losses)}, "
                             f"optimizers_spec() names {names}")
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        losses = {n: out.losses[n].detach().float() for n in names}
        ok = all(bool(torch.isfinite(v)) and v.ndim == 0 for v in losses.values())
        norms = {n: float("nan") for n in names}
        if ok:
            for i, n in enumerate(names):
                out.losses[n].backward(inputs=spec[n], retain_graph=i + 1 < len(names))
            for n in names:
                norms[n] = float(torch.nn.utils.clip_grad_norm_(spec[n], clip))
            ok = all(math.isfinite(v) for v in norms.values())
        lrs = {n: optimizers[n].param_groups[0]["lr"] for n in names}
        if ok:
            for n in names:
                optimizers[n].step()
            if ema is not None:
                ema.update(family)
        else:
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            bad_steps += 1
        for s in schedulers.values():
            s.step()
        step += 1
        last_losses = {n: float(v) for n, v in losses.items()}
        if not ok or step % cfg.log_every == 0:
            row: dict[str, Any] = {"step": step, "skipped": not ok}
            row.update({f"loss/{n}": v for n, v in last_losses.items()})
            row.update({f"lr/{n}": v for n, v in lrs.items()})
            row.update({f"grad_norm/{n}": v for n, v in norms.items()})
            row.update({f"log/{k}": float(v) for k, v in out.logs.items()})
            metrics.append(row)
        if not ok:
            log.warning("step %d skipped: losses %s, grad norms %s (%d/%d bad steps)", step, last_losses, norms,
                        bad_steps, cfg.max_bad_steps)
            if bad_steps > cfg.max_bad_steps:
                metrics.flush()
                raise TrainingDiverged(f"training aborted at step {step}: {bad_steps} steps with a non-finite loss or "
                                       f"gradient (max_bad_steps={cfg.max_bad_steps}); last losses {last_losses}, "
                                       f"grad norms {norms}. Lower lr, raise grad clipping or check the data.")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            last_ckpt = checkpoint()
        if cfg.sample_every and step % cfg.sample_every == 0:
            imgs = sample_images(family, ema, cfg.sample_count, cfg.seed + step, cfg.sample_steps)
            path = run_dir / "samples" / f"step_{step:08d}.png"
            save_grid(imgs, path)
            samples.append(str(path))
    elapsed = time.perf_counter() - t0
    metrics.flush()
    done = step - start_step
    return {"step": step, "start_step": start_step, "finished": step >= cfg.steps, "bad_steps": bad_steps,
            "last_losses": last_losses, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "metrics": str(run_dir / METRICS), "samples": samples, "device": str(device),
            "precision": "bf16" if bf16 else "fp32",
            "steps_per_s": done / elapsed if done and elapsed > 0 else None}


__all__ = ["TrainConfig", "TrainingDiverged", "CheckpointError", "train", "build", "lr_factor", "sample_images",
           "save_grid", "batch_stream", "read_checkpoint"]
