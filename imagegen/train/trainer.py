"""The generic trainer: one loop for every model family (models/base.py contract).

Per step, for each micro-batch slot this process owns (imagegen/train/distributed.py):
``family(batch, generator)`` (= loss) under optional bf16 autocast (CUDA only), each loss
backpropagated into its own optimizer's parameters (gradients accumulated over the slots; DDP
or a flat all-reduce averages them over processes).  Then gradients are clipped per optimizer;
a non-finite loss or gradient norm skips the step on every rank (counted, abort after
``max_bad_steps``); every AdamW steps, LR schedulers (warmup then cosine/constant) step, EMA
updates.  Rank 0 alone writes metrics, checkpoints, sample grids and progress.

Exact resume.  Data come from the loader in resampled mode with a fixed seed; an "epoch" is
``epoch_batches`` batches and its order is a function of (seed, epoch) alone.  The data
position is (epoch, batches consumed in it); on resume the trainer calls ``set_epoch(epoch)``
and skips the consumed batches (they are decoded and thrown away: exact but costs up to one
epoch of reading; with the same ``num_workers`` the batch order is the same).  Weights,
optimizer moments, scheduler, EMA and all RNG states come from the checkpoint, so on CPU a
resumed run repeats the uninterrupted run's losses bit for bit.  Checkpoints hold the loss
generator of every slot, so a run may resume on another number of processes.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from imagegen.artifacts import write_json_atomic
from imagegen.determinism import torch_threads
from imagegen.loader import aspect_buckets, derive_seed, make_loader
from imagegen.train import distributed
from imagegen.train.checkpoint import (CheckpointError, latest_checkpoint, latest_valid_checkpoint, load_checkpoint, read_checkpoint,
                                       save_checkpoint)
from imagegen.train.config import RESUMABLE_CHANGES, TrainConfig  # noqa: F401 (re-exported)
from imagegen.train.distributed import DistEnv
from imagegen.train.ema import EMA
from models.base import Family, backward_losses, check_losses, check_optimizers_spec
from models.registry import build_family, get_family

log = logging.getLogger(__name__)

METRICS = "metrics.parquet"
class TrainingDiverged(FloatingPointError):
    """Too many steps with a non-finite loss or gradient."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """LR multiplier for the update at (0-based) ``step``: linear warmup, then cosine to 0 or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------ data


def slot_seed(seed: int, slot: int) -> int:
    """Seed of micro-batch slot ``slot``'s loss generator (slot 0 uses the run seed itself)."""
    return seed if slot == 0 else derive_seed("train-slot", seed, slot) % 2**62


def train_buckets(cfg: TrainConfig, family: Family) -> tuple[tuple[int, int], ...] | None:
    """The run's aspect-ratio buckets (None: square crops at image_size)."""
    if not cfg.aspect_buckets:
        return None
    multiple = family.size_multiple()
    if multiple is None:
        raise ValueError(f"aspect_buckets: {type(family).__name__} takes only its square image_size")
    return aspect_buckets(family.cfg.image_size, multiple, cfg.aspect_buckets)


def batch_stream(cfg: TrainConfig, shards: Sequence[str | Path], image_size: int, epoch: int, skip: int,
                 slot: int = 0, buckets: Sequence[tuple[int, int]] | None = None
                 ) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(epoch, batches consumed in that epoch after this one, batch) of micro-batch slot ``slot``,
    from data position (epoch, skip).  Slot s reads loader rank s of ``micro_batches``.  With
    ``buckets`` each batch is one aspect-ratio bucket (each worker's partial buckets are dropped at
    the end of an epoch, so an epoch may hold fewer than ``epoch_batches`` batches)."""
    sizing: dict[str, Any] = {"buckets": tuple(buckets)} if buckets else {"image_size": image_size}
    loader = make_loader(shards, batch_size=cfg.micro_batch_size, num_workers=cfg.num_workers, drop_last=True,
                         resampled=True, **sizing,
                         epoch_samples=cfg.epoch_batches * cfg.micro_batch_size, shuffle_buffer=cfg.shuffle_buffer,
                         seed=cfg.seed % 2**62, rank=slot, world_size=cfg.micro_batches,
                         with_meta=bool(cfg.label_field) or get_family(cfg.family).needs_meta)
    while True:
        loader.dataset.set_epoch(epoch)
        seen = 0
        for batch in loader:
            seen += 1
            if seen > skip:
                yield epoch, seen, batch
        if seen == 0:
            raise RuntimeError(f"data epoch {epoch} yielded no full batch of {cfg.micro_batch_size} from "
                               f"{len(shards)} shard(s) for slot {slot}; are the shards readable and the micro-batch "
                               "not larger than the data?")
        epoch, skip = epoch + 1, 0


class LabelError(ValueError):
    """A sample whose class cannot be determined (names its key)."""


def _field(meta: Any, path: str) -> Any:
    value = meta
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class Labeler:
    """Batch -> LongTensor of class indices, from a .json field or from caption keywords."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.field = cfg.label_field
        self.names = cfg.class_names
        if self.field and not self.names:
            raise ValueError(f"label_field={self.field!r} needs the class list (TrainConfig.classes); "
                             "the train run layer fills it from the dataset manifest")
        self.index = {name: i for i, name in enumerate(self.names)}
        # whole words, any case, plural -s/-es accepted ("two red circles" -> circle)
        self.pattern = (re.compile(r"\b(" + "|".join(re.escape(w.strip()) for w in cfg.label_keywords) +
                                   r")(?:s|es)?\b", re.IGNORECASE) if cfg.label_keywords else None)
        self.lower = {w.strip().lower(): i for i, w in enumerate(cfg.label_keywords)}

    def label(self, caption: str, meta: Any, key: str) -> int:
        if self.pattern is not None:
            m = self.pattern.search(caption)
            if m is None:
                raise LabelError(f"sample {key!r}: none of the label_keywords {list(self.names)} occurs in its "
                                 f"caption {caption!r}")
            return self.lower[m.group(1).lower()]
        value = _field(meta, str(self.field))
        if value is None:
            raise LabelError(f"sample {key!r}: its .json has no field {self.field!r}")
        if str(value) not in self.index:
            raise LabelError(f"sample {key!r}: class {value!r} (field {self.field!r}) is not among the run's "
                             f"{len(self.names)} classes, e.g. {list(self.names[:5])}")
        return self.index[str(value)]

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        metas = batch.get("meta") or [None] * len(batch["key"])
        return torch.tensor([self.label(c, m, k) for c, m, k in zip(batch["caption"], metas, batch["key"])],
                            dtype=torch.long)


class CaptionWordDropout:
    """Attribute dropout of training captions: with probability ``cfg.caption_word_dropout`` a caption
    loses every word of ``cfg.caption_drop_words`` ("a photo of an orange star" -> "a photo of a star"),
    so a text-conditioned model also learns prompts that leave an attribute out (GenEval's
    single_object prompts name no colour).  The draw is a function of (seed, step, slot, index in
    the batch) alone: the same run drops the same words, also after a resume."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.p = cfg.caption_word_dropout
        self.seed = cfg.seed
        words = sorted({w.strip() for w in cfg.caption_drop_words}, key=len, reverse=True)
        self.pattern = (re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
                        if words else None)

    @property
    def active(self) -> bool:
        return self.pattern is not None and self.p > 0

    def strip(self, caption: str) -> str:
        """``caption`` without the drop words, spaces collapsed and a/an agreeing with the next word."""
        if self.pattern is None:
            return caption
        return _fix_articles(" ".join(self.pattern.sub(" ", caption).split()))

    def __call__(self, captions: Sequence[str], step: int, slot: int) -> list[str]:
        if not self.active:
            return list(captions)
        rng = np.random.default_rng(derive_seed("caption-word-dropout", self.seed, step, slot))
        drop = rng.random(len(captions)) < self.p
        return [self.strip(str(c)) if d else str(c) for c, d in zip(captions, drop)]


def _fix_articles(text: str) -> str:
    """'a'/'an' before a word made to agree with that word's first letter (vowel -> 'an')."""
    def fix(m: re.Match[str]) -> str:
        art, word = m.group(1), m.group(2)
        want = "an" if word[0].lower() in "aeiou" else "a"
        return (want.capitalize() if art[0].isupper() else want) + " " + word
    return re.sub(r"\b(an?|An?)\s+([A-Za-z]\w*)", fix, text)


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


def sample_conditioning(cfg: TrainConfig, n: int) -> Any:
    """What the sample grids are conditioned on: classes in turn, the run's prompts in turn, or None."""
    conditioning = cfg.model.get("conditioning", "none")
    if conditioning == "class":
        return torch.arange(n) % int(cfg.model["num_classes"])
    if conditioning == "text" and cfg.sample_prompts:
        return [cfg.sample_prompts[i % len(cfg.sample_prompts)] for i in range(n)]
    return None


def sample_images(family: Family, ema: EMA | None, n: int, seed: int, steps: int | None = None,
                  conditioning: Any = None, guidance: float = 1.0, sampler: str | None = None) -> Tensor:
    """n samples with the EMA weights swapped in (raw weights when EMA is off); the live weights
    are restored afterwards.  A dedicated generator leaves the training RNG streams alone."""
    gen = torch.Generator(device=family.device).manual_seed(seed)
    if guidance != 1.0 and conditioning is None:
        guidance = 1.0  # no condition to guide towards (e.g. text model without sample prompts)
    ctx = ema.swap_in(family) if ema is not None else nullcontext(family)
    with ctx:
        return family.sample(n, conditioning=conditioning, sampler=sampler, steps=steps, guidance=guidance,
                             generator=gen).float().cpu()


def save_grid(images: Tensor, path: Path, columns: int | None = None) -> None:
    """[-1, 1] images -> one PNG grid, ``columns`` per row (default: up to 8), uint8 = round((x+1)*127.5)."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [n, C, H, W]
    n, c, h, w = x.shape
    cols = max(1, min(n, columns or 8))
    rows = -(-n // cols)
    grid = torch.zeros((c, rows * h, cols * w), dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    tmp.replace(path)


def save_loss_curve(metrics_path: Path, png: Path) -> Path | None:
    """Loss (and LR) against step from metrics.parquet, one line per optimizer; None if no rows."""
    if not metrics_path.is_file():
        return None
    df = pd.read_parquet(metrics_path)
    loss_cols = [c for c in df.columns if c.startswith("loss/")]
    if df.empty or not loss_cols:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[~df["skipped"]] if "skipped" in df else df
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for col in loss_cols:
        ax.plot(ok["step"], ok[col], lw=0.6, alpha=0.35)
        window = max(1, len(ok) // 20)
        ax.plot(ok["step"], ok[col].rolling(window, min_periods=1).mean(), lw=1.6, label=f"{col} (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if (ok[loss_cols] > 0).all().all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(png)
    return png


# ------------------------------------------------------------------------------------------ train


def resolve_device(cfg: TrainConfig, env: DistEnv | None = None) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device='cuda' but no CUDA device is available")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", env.local_rank if env is not None and env.distributed else torch.cuda.current_device())
    return torch.device("cpu")


def build(cfg: TrainConfig, device: torch.device) -> tuple[Family, dict[str, torch.optim.Optimizer],
                                                           dict[str, Any], EMA | None]:
    """Family (seeded), one AdamW + LambdaLR per optimizers_spec() entry, EMA (or None)."""
    torch.manual_seed(cfg.seed)
    family = build_family(cfg.family, cfg.model).to(device)
    spec = check_optimizers_spec(family)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizers = {name: torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                          weight_decay=cfg.weight_decay, **fused) for name, params in spec.items()}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
                  for name, opt in optimizers.items()}
    # the EMA shadows what a checkpoint holds (all of it, or an adapter's weights on a frozen base)
    ema = (EMA(family, cfg.ema_decay, names=family.checkpoint_state(), warmup=cfg.ema_warmup)
           if cfg.ema_decay > 0 else None)
    return family, optimizers, schedulers, ema


class Progress:
    """progress.json in the run folder (atomic, at most every ``every_s`` seconds, and at the end)
    plus an optional callback, for Prefect artifacts or a parent process polling the file."""

    def __init__(self, run_dir: Path, total: int, callback: Callable[[dict[str, Any]], None] | None,
                 every_s: float = 2.0) -> None:
        self.path, self.total, self.callback, self.every_s = run_dir / "progress.json", total, callback, every_s
        self.last = -math.inf
        self.t0 = time.perf_counter()
        self.step0: int | None = None

    def update(self, step: int, losses: dict[str, float], force: bool = False, **extra: Any) -> None:
        now = time.perf_counter()
        if self.step0 is None:
            self.step0, self.t0 = step, now
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = (step - self.step0) / (now - self.t0) if now > self.t0 and step > self.step0 else None
        info = {"step": step, "steps": self.total, "fraction": step / self.total, "losses": losses,
                "steps_per_s": rate, "eta_s": (self.total - step) / rate if rate else None, **extra}
        write_json_atomic(self.path, info)
        if self.callback is not None:
            self.callback(info)


def _active_optimizers(family: Family, step: int, names: list[str]) -> list[str]:
    """The optimizers that update at (0-based) ``step``: ``family.optimizers_for_step`` checked."""
    active = list(family.optimizers_for_step(step))
    if not active or not set(active) <= set(names) or len(set(active)) != len(active):
        raise ValueError(f"{type(family).__name__}.optimizers_for_step({step}) returned {active}; it must be a "
                         f"non-empty subset of the optimizers {names}")
    return [n for n in names if n in active]  # in optimizers_spec order


def train(cfg: TrainConfig | dict[str, Any], shards: Sequence[str | Path], run_dir: str | Path, *,
          stop_after: int | None = None, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume, when ``run_dir`` holds a checkpoint) up to ``cfg.steps``.

    Runs as one process, or as every rank of a torchrun group (imagegen.train.launch): rank 0
    writes the run folder, all ranks return the same summary.  ``stop_after``: return after that
    many steps of this call without a final checkpoint, as a killed process would (for tests).
    ``progress(info)`` is called on rank 0 at most every 2 s with step, losses and rate.
    """
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig(**cfg)
    with torch_threads(cfg.threads):  # the run id hashes it (docs/DESIGN.md, "What goes into an id")
        return _train(cfg, shards, run_dir, stop_after=stop_after, progress=progress)


def _train(cfg: TrainConfig, shards: Sequence[str | Path], run_dir: str | Path, *,
           stop_after: int | None, progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 0):
        raise ValueError(f"stop_after must be an int >= 0 or None, got {stop_after!r}")
    env = distributed.current()
    slots = env.slots(cfg.micro_batches)
    run_dir = Path(run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg, env)
    bf16 = cfg.precision == "bf16" and device.type == "cuda"
    if cfg.precision == "bf16" and not bf16:
        warnings.warn("precision='bf16' applies on CUDA only; this CPU run uses fp32", stacklevel=2)
    family, optimizers, schedulers, ema = build(cfg, device)
    if family.cfg.data == "pixels" and family.cfg.channels != 3:
        raise ValueError(f"train: pixel shards hold RGB images; the family config has channels={family.cfg.channels} "
                         "(train on a latent dataset with data='latents' for other channel counts)")
    labeler = Labeler(cfg) if family.cfg.conditioning == "class" else None
    word_dropout = CaptionWordDropout(cfg)
    generators = {s: torch.Generator(device=device).manual_seed(slot_seed(cfg.seed, s)) for s in slots}
    cfg_json = cfg.model_dump(mode="json")

    step, epoch, skip, bad_steps = 0, 0, 0, 0
    ckpt = latest_valid_checkpoint(run_dir)  # a damaged newest one is skipped with a warning
    if ckpt is not None:
        may_differ = RESUMABLE_CHANGES + (("steps",) if cfg.schedule == "constant" else ())
        meta = load_checkpoint(ckpt, family=family, optimizers=optimizers, schedulers=schedulers, ema=ema,
                               config=cfg_json, generators=generators, may_differ=may_differ)
        step = int(meta["step"])
        st = meta["trainer"]
        epoch, skip, bad_steps = int(st["epoch"]), int(st["batch_in_epoch"]), int(st["bad_steps"])
        log.info("resumed from %s (step %d)", ckpt, step)
    if env.is_main:
        write_json_atomic(run_dir / "config.json", cfg_json)
    start_step = step
    metrics = MetricsLog(run_dir / METRICS, step) if env.is_main else None
    spec = check_optimizers_spec(family)
    names = list(spec)
    model: torch.nn.Module = family
    if env.distributed and len(names) == 1:
        # one loss over all trainable weights: DDP overlaps the gradient all-reduce with backward
        model = DDP(family, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    manual_sync = env.distributed and model is family
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    buckets = train_buckets(cfg, family)
    streams = [batch_stream(cfg, shards, family.cfg.image_size, epoch, skip, s, buckets) for s in slots]
    last_ckpt: Path | None = ckpt
    samples: list[str] = []
    last_losses: dict[str, float] = {}
    tracker = Progress(run_dir, cfg.steps, progress) if env.is_main else None

    def checkpoint() -> Path | None:
        states = {k: v for part in distributed.gather(env, {s: g.get_state() for s, g in generators.items()})
                  for k, v in part.items()}
        if not env.is_main:
            return None
        metrics.flush()
        return save_checkpoint(run_dir, step, family=family, optimizers=optimizers, schedulers=schedulers, ema=ema,
                               config=cfg_json, generator_states=states, keep=cfg.keep_checkpoints,
                               trainer_state={"epoch": epoch, "batch_in_epoch": skip, "bad_steps": bad_steps,
                                              "world_size": env.world_size})

    def grid(tag: str) -> None:
        imgs = sample_images(family, ema, cfg.sample_count, cfg.seed + step, cfg.sample_steps,
                             sample_conditioning(cfg, cfg.sample_count), cfg.sample_guidance, cfg.sample_sampler)
        path = run_dir / "samples" / f"{tag}.png"
        k = int(cfg.model.get("num_classes") or 0)
        save_grid(imgs, path, columns=k if 1 < k <= 10 else None)  # class-conditional: one column per class
        samples.append(str(path))

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        if labeler is not None:
            batch["label"] = labeler(batch)
        return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    family.train()
    t0 = time.perf_counter()
    data_wait = 0.0
    k = len(slots)
    while step < cfg.steps and (stop_after is None or step - start_step < stop_after):
        tw = time.perf_counter()
        got = [next(st) for st in streams]
        data_wait += time.perf_counter() - tw
        epoch, skip = got[0][0], got[0][1]
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(len(names), device=device)
        log_sums: dict[str, float] = {}
        active = _active_optimizers(family, step, names)
        for j, (s, (_, _, batch)) in enumerate(zip(slots, got)):
            if word_dropout.active:
                batch = {**batch, "caption": word_dropout(batch["caption"], step, s)}
            batch = to_device(batch)
            sync = model.no_sync() if isinstance(model, DDP) and j + 1 < k else nullcontext()
            with sync:
                with autocast:
                    out = model(batch, generators[s])
                check_losses(family, out, names)
                # Non-finite losses are backpropagated too (NaN gradients): every rank then sees a
                # non-finite norm after the all-reduce and skips the step together.
                backward_losses(out, spec, active, k)
            loss_sum += torch.stack([out.losses[n].detach().float() for n in names])
            for key, v in out.logs.items():
                log_sums[key] = log_sums.get(key, 0.0) + float(v) / k
        if manual_sync:
            for n in active:
                distributed.average_gradients(env, spec[n])
        # losses and logs averaged over all slots of all processes, in one all-reduce
        log_keys = sorted(log_sums)
        means = distributed.mean_across(env, torch.cat([loss_sum / k, torch.tensor(
            [log_sums[key] for key in log_keys], device=device, dtype=loss_sum.dtype)])).tolist()
        norms = {n: float(torch.nn.utils.clip_grad_norm_(spec[n], clip)) if n in active else float("nan")
                 for n in names}
        last_losses = dict(zip(names, means[:len(names)]))
        log_means = dict(zip(log_keys, means[len(names):]))
        ok = all(math.isfinite(v) for v in [*last_losses.values(), *(norms[n] for n in active)])
        lrs = {n: optimizers[n].param_groups[0]["lr"] for n in names}
        if ok:
            for n in active:
                optimizers[n].step()
            family.after_step()
            if ema is not None:
                ema.update(family, step)
        else:
            bad_steps += 1
        with warnings.catch_warnings():
            # the LR follows the global step, also for an optimizer that sat this step out
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for sch in schedulers.values():
                sch.step()
        step += 1
        if metrics is not None and (not ok or step % cfg.log_every == 0):
            row: dict[str, Any] = {"step": step, "skipped": not ok}
            row.update({f"loss/{n}": v for n, v in last_losses.items()})
            row.update({f"lr/{n}": v for n, v in lrs.items()})
            row.update({f"grad_norm/{n}": v for n, v in norms.items()})
            row.update({f"log/{key}": v for key, v in log_means.items()})
            metrics.append(row)
        if tracker is not None:
            tracker.update(step, last_losses)
        if not ok:
            log.warning("step %d skipped: losses %s, grad norms %s (%d/%d bad steps)", step, last_losses, norms,
                        bad_steps, cfg.max_bad_steps)
            if bad_steps > cfg.max_bad_steps:
                if metrics is not None:
                    metrics.flush()
                raise TrainingDiverged(f"training aborted at step {step}: {bad_steps} steps with a non-finite loss or "
                                       f"gradient (max_bad_steps={cfg.max_bad_steps}); last losses {last_losses}, "
                                       f"grad norms {norms}. Lower lr, raise grad clipping or check the data.")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            last_ckpt = checkpoint() or last_ckpt
        if env.is_main and cfg.sample_every and step % cfg.sample_every == 0:
            grid(f"step_{step:08d}")
    elapsed = time.perf_counter() - t0
    finished = step >= cfg.steps
    curve = None
    if env.is_main:
        metrics.flush()
        if finished and not (cfg.sample_every and step % cfg.sample_every == 0):
            grid(f"step_{step:08d}")
        curve = save_loss_curve(run_dir / METRICS, run_dir / "loss_curve.png")
        tracker.update(step, last_losses, force=True, finished=finished)
    done = step - start_step
    return {"step": step, "start_step": start_step, "finished": finished, "bad_steps": bad_steps,
            "last_losses": last_losses, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "metrics": str(run_dir / METRICS), "samples": samples, "loss_curve": str(curve) if curve else None,
            "device": str(device), "precision": "bf16" if bf16 else "fp32", "world_size": env.world_size,
            "micro_batches": cfg.micro_batches, "steps_per_s": done / elapsed if done and elapsed > 0 else None,
            "elapsed_s": elapsed, "data_wait_s": data_wait}


__all__ = ["TrainConfig", "TrainingDiverged", "CheckpointError", "LabelError", "train", "build", "lr_factor",
           "sample_images", "save_grid", "save_loss_curve", "batch_stream", "read_checkpoint", "slot_seed"]
