"""Training checkpoints: tensors in safetensors, everything else in JSON; nothing is ever unpickled.

Layout: ``<run>/checkpoints/step_00000100/{tensors.safetensors, state.json}``.  A checkpoint is
written into a hidden temporary folder and renamed into place, so a folder named ``step_*``
is complete; ``state.json`` records the sha256 of the tensor file, so a damaged file is
reported instead of half-loaded.

Tensor keys: ``model/<k>`` (``family.checkpoint_state()``: the state_dict, or for a family
built on a frozen base it rebuilds, such as a LoRA adapter on a diffusers pipeline, only what
training changes), ``ema/<k>``, ``optim/<name>/<param idx>/<k>``
(AdamW's exp_avg, exp_avg_sq, step), ``rng/torch_cpu`` (global CPU generator state, uint8),
``rng/generator/<slot>`` (the loss generator of each micro-batch slot of the global batch, see
trainer.py), ``rng/cuda/<i>``.  JSON: step, config, optimizer
param_groups, LR scheduler state, python/numpy RNG states and the trainer's own state (data
position, bad-step count), and the family's ``checkpoint_info()`` ("family_info": e.g. the base
pipeline's file hashes), which ``family.check_checkpoint_info`` checks before a resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from imagegen.hashing import file_sha256
from imagegen.train.ema import EMA
# the format and its reader live with the models (models/checkpoint.py: load_family); re-exported here
from models.checkpoint import (FORMAT, STATE, TENSORS, CheckpointError, read_checkpoint,  # noqa: F401
                               verify_checkpoint)

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary leftovers are ignored)."""
    base = checkpoints_dir(run_dir)
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; each damaged newer one is
    named in a warning (and left in place: it is renamed aside by the next save).  When every
    checkpoint is damaged it raises instead of silently starting over."""
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            errors.append(str(exc))
            log.warning("skipping damaged checkpoint %s (%s); falling back to the next older one", path, exc)
    if errors:
        raise CheckpointError("; ".join(errors) + f" — no usable checkpoint is left in {checkpoints_dir(run_dir)}: "
                              "remove the damaged folders to train this run from step 0")
    return None


# ------------------------------------------------------------------------------------------ RNG


Generators = Mapping[int, torch.Generator]


def capture_rng(generator_states: Mapping[int, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Global RNG states of this process plus the given loss-generator states (by slot)."""
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    tensors.update({f"rng/generator/{slot}": st for slot, st in generator_states.items()})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    js = {"python": [py_version, list(py_state), py_gauss],
          "numpy": [np_name, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return tensors, js


def restore_rng(tensors: Mapping[str, Tensor], js: Mapping[str, Any], generators: Generators) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"])
    for slot, gen in generators.items():
        gen.set_state(tensors[f"rng/generator/{slot}"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")),
                                       key=lambda k: int(k.rsplit("/", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    v, state, gauss = js["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------ save


def model_state(family: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint holds of ``family`` (its ``checkpoint_state()``; a plain module's state_dict)."""
    hook = getattr(family, "checkpoint_state", None)
    return hook() if hook is not None else family.state_dict()


def _cpu(t: Tensor) -> Tensor:
    # clone: safetensors refuses tensors sharing storage (tied weights, views)
    return t.detach().to("cpu", copy=True).contiguous()


def _sweep_dead(base: Path) -> None:
    """Remove ``.tmp-step_*-<pid>`` folders of processes that no longer run (a run killed mid-save)."""
    from imagegen.artifacts import _pid_alive

    for p in base.glob(".tmp-step_*-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, *, family: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                    schedulers: Mapping[str, Any], ema: EMA | None, config: Mapping[str, Any],
                    generator_states: Mapping[int, Tensor], trainer_state: Mapping[str, Any], keep: int) -> Path:
    """Write ``step_<step>`` atomically and keep only the newest ``keep`` checkpoints.

    ``generator_states``: the loss-generator state of every micro-batch slot (under DDP, gathered
    from all ranks by the caller), so any rank layout can resume."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    tensors: dict[str, Tensor] = {f"model/{k}": _cpu(v) for k, v in model_state(family).items()}
    if ema is not None:
        tensors.update({f"ema/{k}": _cpu(v) for k, v in ema.state_dict().items()})
    optim_js: dict[str, Any] = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        other: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    tensors[f"optim/{name}/{idx}/{k}"] = _cpu(v)
                else:
                    other.setdefault(str(idx), {})[k] = v
        optim_js[name] = {"param_groups": sd["param_groups"], "other_state": other}
    rng_tensors, rng_js = capture_rng(generator_states)
    tensors.update(rng_tensors)

    base = checkpoints_dir(run_dir)
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"step_{step:08d}"
    tmp = base / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _sweep_dead(base)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": str(FORMAT)})
        meta = {
            "format": FORMAT, "step": step, "config": dict(config), "tensors_sha256": file_sha256(tmp / TENSORS),
            "has_ema": ema is not None, "optimizers": optim_js,
            "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
            "rng": rng_js, "trainer": dict(trainer_state),
            "family_info": dict(getattr(family, "checkpoint_info", dict)()),
        }
        (tmp / STATE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for later in list_checkpoints(run_dir):
        # newer than the one just saved: this run resumed from before it, so it was damaged
        if int(_STEP_DIR.match(later.name).group(1)) > step:
            aside = later.with_name(f"{later.name}.damaged-{os.getpid()}")
            os.replace(later, aside)
            log.warning("moved the damaged checkpoint %s aside to %s", later, aside)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ load


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], may_differ: Iterable[str] = ()) -> list[str]:
    skip = set(may_differ)
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in skip:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: checkpoint {a!r} != now {b!r}")
    return out


def _check_shapes(what: str, path: Path, saved: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    bad = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
           for k in sorted(set(saved) & set(expected)) if tuple(saved[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad:
        raise CheckpointError(f"checkpoint {path}: {what} does not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, shape mismatches {bad[:5]}")


def _sub(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _fix_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else g for g in groups]


def load_checkpoint(path: Path, *, family: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                    schedulers: Mapping[str, Any], ema: EMA | None, config: Mapping[str, Any],
                    generators: Generators, may_differ: Iterable[str] = ()) -> dict[str, Any]:
    """Restore everything from ``path`` into the given objects; returns the checkpoint's state dict.

    Every check (integrity, config, family, key sets and shapes) runs before anything is
    modified, so a refused checkpoint leaves the fresh model untouched.
    """
    path = Path(path)
    tensors, meta = read_checkpoint(path)
    saved_cfg = meta.get("config", {})
    if saved_cfg.get("family") != config.get("family"):
        raise CheckpointError(f"checkpoint {path} is for family {saved_cfg.get('family')!r}, "
                              f"this run trains {config.get('family')!r}")
    diffs = config_differences(saved_cfg, config, may_differ)
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made with a different config; resuming would not reproduce "
                              f"the run. Differences: {'; '.join(diffs)}")
    check_info = getattr(family, "check_checkpoint_info", None)
    if check_info is not None:
        try:
            check_info(meta.get("family_info") or {})
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
    model_sd = _sub(tensors, "model/")
    _check_shapes("model weights", path, model_sd, model_state(family))
    if (ema is not None) != bool(meta.get("has_ema")):
        raise CheckpointError(f"checkpoint {path}: has_ema={meta.get('has_ema')} but this run "
                              f"{'uses' if ema is not None else 'does not use'} EMA")
    if ema is not None:
        _check_shapes("EMA weights", path, _sub(tensors, "ema/"), ema.state_dict())
    if set(meta.get("optimizers", {})) != set(optimizers):
        raise CheckpointError(f"checkpoint {path}: optimizers {sorted(meta.get('optimizers', {}))}, "
                              f"the family now has {sorted(optimizers)}")
    opt_states = {}
    for name, opt in optimizers.items():
        params = [p for g in opt.param_groups for p in g["params"]]
        js = meta["optimizers"][name]
        state: dict[int, dict[str, Any]] = {}
        for k, v in _sub(tensors, f"optim/{name}/").items():
            idx, key = k.split("/", 1)
            i = int(idx)
            if i >= len(params):
                raise CheckpointError(f"checkpoint {path}: optimizer {name!r} has state for parameter {i}, "
                                      f"the model has {len(params)}")
            if v.ndim and tuple(v.shape) != tuple(params[i].shape):
                raise CheckpointError(f"checkpoint {path}: optimizer {name!r} state {key!r} of parameter {i} has "
                                      f"shape {tuple(v.shape)}, the parameter {tuple(params[i].shape)}")
            state.setdefault(i, {})[key] = v
        for idx, extra in js.get("other_state", {}).items():
            state.setdefault(int(idx), {}).update(extra)
        opt_states[name] = {"state": state, "param_groups": _fix_groups(js["param_groups"])}
    if set(meta.get("schedulers", {})) != set(schedulers):
        raise CheckpointError(f"checkpoint {path}: schedulers {sorted(meta.get('schedulers', {}))} != "
                              f"{sorted(schedulers)}")
    if "rng/torch_cpu" not in tensors or "rng" not in meta:
        raise CheckpointError(f"checkpoint {path}: no RNG states")
    missing_gen = sorted(slot for slot in generators if f"rng/generator/{slot}" not in tensors)
    if missing_gen:
        raise CheckpointError(f"checkpoint {path}: no loss-generator state for micro-batch slot(s) {missing_gen}")

    # -- all checks passed: restore
    load_state = getattr(family, "load_checkpoint_state", None)
    if load_state is not None:
        load_state(model_sd)
    else:
        family.load_state_dict(model_sd, strict=True)
    if ema is not None:
        ema.load_state_dict(_sub(tensors, "ema/"))
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(opt_states[name])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path}: optimizer {name!r} state does not fit ({exc})") from None
    for name, sched in schedulers.items():
        sched.load_state_dict(meta["schedulers"][name])
    restore_rng(tensors, meta["rng"], generators)
    return meta
