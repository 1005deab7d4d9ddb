"""Training runs: one folder per (dataset id, training config, code version) under ``<root>/runs``.

``train_run(request, root)`` resolves the dataset from the registry, completes the config from
the dataset (class list, sample prompts, the world's reference CLIP), checks everything that can
be checked before a step is taken, and then trains in this process (``nproc=1``) or on
``nproc`` torchrun processes (also for one process when a timeout is set: a child process can
be killed on time, a thread cannot be interrupted).  The run id is a hash of the dataset id, the config fields that
change the trajectory (not logging/sampling knobs) and the source of the code the run depends
on, so triggering the same run again resumes it from its last checkpoint, or, when it has
finished, returns it as it is.

Run folder: ``card.json`` (status, request, identity, summary), ``config.json``,
``metrics.parquet``, ``progress.json``, ``loss_curve.png``, ``samples/step_*.png``,
``checkpoints/step_*/{tensors.safetensors, state.json}``, ``launch/`` (torchrun logs).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from imagegen.artifacts import read_card, write_json_atomic
from imagegen.hashing import code_version, stable_hash
from imagegen.paths import models_dir
from imagegen.registry import DatasetRef, get_dataset
from imagegen.train.checkpoint import latest_checkpoint, latest_valid_checkpoint, read_checkpoint, verify_checkpoint
from imagegen.train.config import RESUMABLE_CHANGES, TrainConfig, TrainRequest  # noqa: F401 (re-exported)
from imagegen.train.presets import TRAIN_PRESETS, WORLD_TEXT_ENCODER  # noqa: F401 (re-exported)
from models.registry import get_family

RUNS = "runs"
CARD = "card.json"


class RunError(ValueError):
    """A training request that cannot run as asked (says what and where)."""


class RunBusy(RuntimeError):
    """Another process is training this run right now."""


# ------------------------------------------------------------------------------------------ identity


def train_code_version(family: str) -> str:
    """Source of everything a run's trajectory depends on: the family's module, the model code,
    the trainer and its config, the loader."""
    import imagegen.loader
    import imagegen.train.checkpoint
    import imagegen.train.config
    import imagegen.train.distributed
    import imagegen.train.ema
    import imagegen.train.trainer
    import models.base
    import models.diffusion
    import models.nets.dit
    import models.nets.layers
    import models.nets.unet
    import models.samplers
    import models.text
    from models.registry import get_family

    fam = get_family(family)
    import sys

    shared = [models.base, models.diffusion, models.samplers, models.text, models.nets.layers, models.nets.unet,
              models.nets.dit]
    own = [m for m in _models_closure(sys.modules[fam.__module__]) if m not in shared]
    return code_version(*own, *shared, imagegen.loader, imagegen.train.trainer, imagegen.train.config,
                        imagegen.train.checkpoint, imagegen.train.ema, imagegen.train.distributed)


def _models_closure(module: Any) -> list[Any]:
    """``module`` and every ``models.*`` module it uses, transitively (names it imported: modules,
    classes, functions), in a fixed order: a family built on another's code (VQ-GAN on VQ and the
    KL autoencoder, VAR on the multi-scale tokenizer) changes id when that code changes."""
    import sys
    import types

    seen: dict[str, Any] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        if m.__name__ in seen:
            continue
        seen[m.__name__] = m
        package = hasattr(m, "__path__")  # its submodules are attributes once anyone imported them: skip those
        for value in vars(m).values():
            if isinstance(value, types.ModuleType):
                name = None if package else value.__name__
            else:
                name = getattr(value, "__module__", None)
            if isinstance(name, str) and name.startswith("models.") and name not in seen and name in sys.modules:
                todo.append(sys.modules[name])
    return [seen[k] for k in sorted(seen)]


def run_identity(dataset_id: str, cfg: TrainConfig) -> dict[str, Any]:
    cfg_json = cfg.model_dump(mode="json")
    return {"dataset": dataset_id,
            "config": {k: v for k, v in cfg_json.items() if k not in RESUMABLE_CHANGES},
            "code": train_code_version(cfg.family)}


def runs_dir(root: Path) -> Path:
    return Path(root) / RUNS


# ------------------------------------------------------------------------------------------ prepare


@dataclass(frozen=True)
class PreparedRun:
    dataset: DatasetRef
    config: TrainConfig  # as requested, completed from the dataset: the run's identity
    resolved: TrainConfig  # what the trainer gets (aliases such as text_encoder='world' resolved)
    run_id: str
    run_dir: Path
    identity: dict[str, Any]


def _manifest(ds: DatasetRef, columns: list[str] | None = None) -> pd.DataFrame:
    path = ds.path / "manifest.parquet"
    if not path.is_file():
        raise RunError(f"dataset {ds.id} at {ds.path} has no manifest.parquet")
    return pd.read_parquet(path, columns=columns)


def _complete(cfg: TrainConfig, ds: DatasetRef) -> TrainConfig:
    """Fill in what comes from the dataset and refuse what the dataset cannot give."""
    data = cfg.model_dump(mode="json")
    conditioning = cfg.model.get("conditioning", "none")
    latents = ds.card.get("kind") == "latents"
    if latents != (cfg.model.get("data") == "latents"):
        raise RunError(f"dataset {ds.id} holds {'latents' if latents else 'images'}; set model.data="
                       f"{'latents' if latents else 'pixels'} (a latent dataset comes from `imagegen.latents`)")
    if latents:  # the latent grid and the decoder come from the dataset's card
        c, h, _ = ds.card["latent_shape"]
        data["model"] = {**data["model"], "channels": c, "image_size": h, "latent_scale": ds.card["latent_scale"],
                         "autoencoder": ds.card["source"].get("autoencoder") or f"run:{ds.card['source']['autoencoder_run']}"}
        if ds.card.get("tokens"):
            if "vocab_size" not in get_family(cfg.family).Config.model_fields:
                raise RunError(f"dataset {ds.id} holds discrete tokens; family {cfg.family!r} models continuous "
                               "latents (train a token model such as maskgit)")
            data["model"]["vocab_size"] = ds.card["vocab_size"]
        cfg = TrainConfig(**data)
        data = cfg.model_dump(mode="json")
    fields = get_family(cfg.family).Config.model_fields
    if "base_files" in fields and cfg.model.get("base_files") is None and cfg.model.get("pipeline"):
        # a diffusers base is identified by its files, not its path: the run id hashes them
        from models.hf_diffusers import DiffusersError, resolve_spec

        try:
            files = resolve_spec(str(cfg.model["pipeline"]))[1]["files"]
        except DiffusersError as exc:
            raise RunError(str(exc)) from None
        data["model"] = {**data["model"], "base_files": files}
        cfg = TrainConfig(**data)
        data = cfg.model_dump(mode="json")
    manifest = _manifest(ds)
    n = len(manifest)
    where = f"dataset {ds.name or ds.id} ({ds.id})"
    if cfg.micro_batch_size > n:
        raise RunError(f"{where} has {n} samples; a micro-batch of {cfg.micro_batch_size} "
                       f"(batch_size {cfg.batch_size} / micro_batches {cfg.micro_batches}) cannot be filled")
    if conditioning == "class" and cfg.label_field:
        col = cfg.label_field
        if col not in manifest.columns:
            meta_cols = [c for c in manifest.columns if c not in ("key", "shard", "caption")]
            raise RunError(f"label_field={col!r} is not a field of {where}; its samples have {meta_cols}")
        values = manifest[col]
        missing = manifest.loc[values.isna(), "key"].tolist()
        if missing:
            raise RunError(f"label_field={col!r}: {len(missing)} of {n} samples of {where} have no value, "
                           f"e.g. keys {missing[:5]}")
        found = sorted(values.astype(str).unique())
        if not cfg.classes:
            data["classes"] = found
            data["model"] = {**data["model"], "num_classes": len(found)}
        else:
            unknown = sorted(set(found) - set(cfg.classes))
            if unknown:
                raise RunError(f"label_field={col!r}: {where} has classes not in the given classes: {unknown[:10]}")
    if conditioning == "class" and cfg.label_keywords:
        from imagegen.train.trainer import LabelError, Labeler

        labeler = Labeler(cfg)
        bad = []
        for key, caption in zip(manifest["key"], manifest["caption"]):
            try:
                labeler.label(str(caption), None, str(key))
            except LabelError:
                bad.append((key, caption))
        if bad:
            raise RunError(f"label_keywords {list(cfg.label_keywords)}: {len(bad)} of {n} captions of {where} contain "
                           f"none of them, e.g. {bad[:3]}")
    if conditioning == "text" and not cfg.sample_prompts:
        caps = manifest.sort_values("key")["caption"].astype(str).tolist()
        step = max(1, len(caps) // cfg.sample_count)
        data["sample_prompts"] = caps[::step][:cfg.sample_count]
    return TrainConfig(**data)


def parent_dataset(ds: DatasetRef) -> str | None:
    """The dataset a derived one (reflow pairs, latents) was made from."""
    src = ds.card.get("source", {})
    return src.get("parent_dataset") or src.get("teacher_dataset")


def _resolve(cfg: TrainConfig, ds: DatasetRef, root: Path) -> TrainConfig:
    for field in ("teacher", "autoencoder", "base"):  # 'run:<id>' -> that finished run's checkpoint folder
        ref_str = cfg.model.get(field)
        if isinstance(ref_str, str) and ref_str.startswith("run:"):
            ref = get_run(root, ref_str[4:])
            if ref.card.get("status") != "finished" or ref.checkpoint is None:
                raise RunError(f"{field} run {ref.id} is {ref.card.get('status')!r}, not finished")
            data = cfg.model_dump(mode="json")
            data["model"] = {**data["model"], field: str(ref.checkpoint.resolve())}
            cfg = TrainConfig(**data)
    repa = cfg.model.get("repa")
    if isinstance(repa, dict) and repa.get("encoder") == WORLD_TEXT_ENCODER:  # REPA's vision encoder
        data = cfg.model_dump(mode="json")
        data["model"] = {**data["model"], "repa": {**repa, "encoder": f"local-dir:{_world_clip(ds, root).resolve()}"}}
        cfg = TrainConfig(**data)
    if cfg.model.get("text_encoder") != WORLD_TEXT_ENCODER:
        return cfg
    data = cfg.model_dump(mode="json")
    data["model"] = {**data["model"], "text_encoder": f"local-dir:{_world_clip(ds, root).resolve()}"}
    return TrainConfig(**data)


def _world_clip(ds: DatasetRef, root: Path) -> Path:
    """The folder of the reference CLIP of the (embedded-world) dataset ``ds`` (alias 'world')."""
    clip_id = ds.card.get("stage_ids", {}).get("reference_clip")
    if not clip_id and parent_dataset(ds):  # a derived dataset (reflow pairs, latents)
        clip_id = get_dataset(root, parent_dataset(ds)).card.get("stage_ids", {}).get("reference_clip")
    if not clip_id:
        raise RunError(f"{WORLD_TEXT_ENCODER!r} (text_encoder or repa.encoder) names the reference CLIP of an "
                       f"embedded-world dataset; dataset {ds.id} was not curated from the world. Give an open_clip spec instead "
                       "(e.g. 'ViT-B-32:laion2b_s34b_b79k' or 'local-dir:/path')")
    path = models_dir(root) / "reference_clip" / clip_id
    if not (path / CARD).is_file():
        raise RunError(f"the reference CLIP {clip_id} of dataset {ds.id} is missing from {path}; "
                       "rerun `imagegen curate` for that dataset to rebuild it")
    return path


def prepare(request: TrainRequest, root: Path) -> PreparedRun:
    """Every check that needs no training step; raises RunError (or LookupError for an unknown dataset)."""
    ds = get_dataset(Path(root), request.dataset)
    if not ds.shards:
        raise RunError(f"dataset {ds.id} at {ds.path} has no shards")
    if request.train.micro_batches % request.nproc:
        raise RunError(f"nproc={request.nproc} must divide micro_batches={request.train.micro_batches}")
    cfg = _complete(request.train, ds)
    resolved = _resolve(cfg, ds, Path(root))
    from models.registry import build_family

    try:  # builds the networks (and loads the text encoder) once: bad net settings fail here
        build_family(resolved.family, resolved.model)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        raise RunError(f"family {resolved.family!r} cannot be built with model {cfg.model}: {exc}") from exc
    identity = run_identity(ds.id, cfg)
    rid = stable_hash(identity)
    return PreparedRun(ds, cfg, resolved, rid, runs_dir(root) / rid, identity)


# ------------------------------------------------------------------------------------------ run


@contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"run {run_dir.name} is being trained by another process right now ({run_dir})") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _finished_step(run_dir: Path) -> int | None:
    ckpt = latest_valid_checkpoint(run_dir)  # a damaged final checkpoint means: train again from the last good one
    if ckpt is None:
        return None
    return int(verify_checkpoint(ckpt)["step"])


def train_run(request: TrainRequest | dict[str, Any], root: Path | str, *,
              progress: Callable[[dict[str, Any]], None] | None = None,
              stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) the run ``request`` describes; returns its summary."""
    if not isinstance(request, TrainRequest):
        request = TrainRequest(**request)
    root = Path(root)
    prep = prepare(request, root)
    run_dir = prep.run_dir
    with _exclusive(run_dir):
        card = read_card(run_dir) if (run_dir / CARD).is_file() else {}
        base = {"run_id": prep.run_id, "run_dir": str(run_dir), "dataset_id": prep.dataset.id,
                "dataset_name": prep.dataset.name, "family": prep.config.family}
        if card.get("status") == "finished" and _finished_step(run_dir) == prep.config.steps:
            return {**card.get("summary", {}), **base, "reused": True}
        t0 = time.time()
        card = {**card, **base, "status": "running", "identity": prep.identity,
                "config": prep.config.model_dump(mode="json"), "nproc": request.nproc, "pid": os.getpid(),
                "started_unix": t0, "created_unix": card.get("created_unix", t0)}
        write_json_atomic(run_dir / CARD, card)
        try:
            if request.nproc == 1 and request.timeout_s is None:
                summary = _train_here(prep, progress, stop_after)
            else:  # in child processes, which a timeout or cancellation can kill whatever thread we are on
                from imagegen.train.launch import launch

                summary = launch(prep.resolved, prep.dataset.shards, run_dir, request.nproc,
                                 timeout_s=request.timeout_s, progress=progress, stop_after=stop_after)
        except BaseException as exc:
            card.update(status="failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
                        error=f"{type(exc).__name__}: {exc}"[:4000], ended_unix=time.time())
            write_json_atomic(run_dir / CARD, card)
            raise
        summary = {**summary, **base, "reused": False, "seconds": round(time.time() - t0, 3)}
        card.update(status="finished" if summary["finished"] else "stopped", summary=summary,
                    ended_unix=time.time())
        card.pop("error", None)
        write_json_atomic(run_dir / CARD, card)
        return summary


def _train_here(prep: PreparedRun, progress: Callable[[dict[str, Any]], None] | None,
                stop_after: int | None) -> dict[str, Any]:
    from imagegen.train.trainer import train

    return train(prep.resolved, prep.dataset.shards, prep.run_dir, progress=progress, stop_after=stop_after)


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class RunRef:
    id: str
    path: Path
    card: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        c = self.card
        s = c.get("summary", {})
        return {"id": self.id, "status": c.get("status"), "family": c.get("family"), "dataset": c.get("dataset_name"),
                "dataset_id": c.get("dataset_id"), "step": s.get("step"), "steps": c.get("config", {}).get("steps"),
                "last_losses": s.get("last_losses"), "path": str(self.path)}

    @property
    def checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)


def list_runs(root: Path | str) -> list[RunRef]:
    base = runs_dir(Path(root))
    if not base.is_dir():
        return []
    refs = [RunRef(p.name, p, read_card(p)) for p in base.iterdir() if p.is_dir() and (p / CARD).is_file()]
    return sorted(refs, key=lambda r: r.card.get("created_unix", 0))


def get_run(root: Path | str, run_id: str) -> RunRef:
    refs = list_runs(root)
    hits = [r for r in refs if r.id == run_id] or [r for r in refs if len(run_id) >= 6 and r.id.startswith(run_id)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise LookupError(f"run id prefix {run_id!r} is ambiguous: {[r.id for r in hits]}")
    raise LookupError(f"no training run {run_id!r} under {runs_dir(Path(root))}; known: {[r.id for r in refs[-10:]]}")
