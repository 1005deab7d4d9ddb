"""Reading a training checkpoint and loading the model family it holds.

A checkpoint folder holds ``tensors.safetensors`` and ``state.json`` (format, step, config, the
tensor file's sha256, ...); nothing is ever unpickled.  This module reads that format and builds
any registered family from it (``load_family``); writing checkpoints and restoring optimizer, EMA
and RNG state for resuming stay with the trainer (``imagegen/train/checkpoint.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from imagegen.hashing import file_sha256

FORMAT = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, or made by a different run setup."""


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state (step, config, the recorded tensors sha256, ...) from its metadata alone:
    ``state.json`` of this format and a readable safetensors header (``safe_open``); no tensor read
    and no hash of the tensor file, so what it records is checked later by :func:`read_checkpoint`
    / :func:`load_family` before any tensor is used.  For ids and checks before work; raises
    :class:`CheckpointError`."""
    path = Path(path)
    meta = _state_json(path)
    _check_header(path)
    if not isinstance(meta.get("tensors_sha256"), str):
        raise CheckpointError(f"checkpoint {path}: {STATE} records no tensors_sha256")
    return meta


def _state_json(path: Path) -> dict[str, Any]:
    st, tf = path / STATE, path / TENSORS
    if not st.is_file() or not tf.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: needs {STATE} and {TENSORS}")
    try:
        meta = json.loads(st.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {STATE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}"
                              f" (this code reads format {FORMAT})")
    return meta


def _checked_state(path: Path) -> dict[str, Any]:
    """The state of a checkpoint folder after its integrity checks (files present, state JSON of
    this format, tensors' sha256 as recorded); raises :class:`CheckpointError`."""
    tf = path / TENSORS
    meta = _state_json(path)
    digest = file_sha256(tf)
    if digest != meta.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: {TENSORS} has sha256 {digest[:16]}..., "
                              f"{STATE} records {str(meta.get('tensors_sha256'))[:16]}...")
    return meta


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check a checkpoint without loading its tensors (integrity as :func:`read_checkpoint`, and a
    readable safetensors header).  Returns the state; raises :class:`CheckpointError`."""
    path = Path(path)
    meta = _checked_state(path)
    _check_header(path)
    return meta


def _check_header(path: Path) -> None:
    """The safetensors header of a checkpoint folder is readable (no tensor read)."""
    try:
        with safe_open(str(path / TENSORS), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read {TENSORS} ({exc})") from None


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, state) of a checkpoint folder, with its integrity checked."""
    path = Path(path)
    meta = _checked_state(path)
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read {TENSORS} ({exc})") from None
    return tensors, meta


def load_family(path: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu") -> Any:
    """The family a training checkpoint holds, weights loaded (EMA when present and ``use_ema``),
    in eval mode.  Distillation families inside it are built for inference only."""
    from models.registry import build_family
    from models.teacher import TeacherError, inference_only

    path = Path(path)
    tensors, meta = read_checkpoint(path)
    cfg = meta.get("config", {})
    if "family" not in cfg or "model" not in cfg:
        raise TeacherError(f"checkpoint {path} has no family/model config in its state.json")
    with inference_only():
        fam = build_family(cfg["family"], cfg["model"])
    fam.check_checkpoint_info(meta.get("family_info") or {})  # e.g. the base an adapter was trained on
    prefix = "ema/" if use_ema and meta.get("has_ema") else "model/"
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    full = fam.checkpoint_state()
    # EMA shadows hold the floating-point entries; anything else comes from the raw weights
    for k in full:
        if k not in sd and f"model/{k}" in tensors:
            sd[k] = tensors[f"model/{k}"]
    missing = sorted(set(full) - set(sd))
    if missing:
        raise TeacherError(f"checkpoint {path} lacks weights {missing[:5]} of family {cfg['family']!r}")
    # a checkpoint written before the family kept only its adapter also holds the frozen base it
    # rebuilds now (the same files: checked above): those entries are not loaded
    rebuilt = (set(sd) - set(full)) & set(fam.state_dict())
    fam.load_checkpoint_state({k: v for k, v in sd.items() if k not in rebuilt})
    fam.to(device).eval().requires_grad_(False)
    fam.checkpoint_path = str(path)
    fam.checkpoint_step = int(meta.get("step", 0))
    return fam
