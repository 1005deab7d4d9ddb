"""The generic trainer (one loop for every model family), its EMA and its checkpoints.

Imports are lazy (module ``__getattr__``): ``import imagegen.train.runs`` or
``imagegen.train.checkpoint`` does not pull in the trainer, the family registry and the
distillation families.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "imagegen.train.checkpoint", "latest_checkpoint": "imagegen.train.checkpoint",
    "list_checkpoints": "imagegen.train.checkpoint", "load_checkpoint": "imagegen.train.checkpoint",
    "read_checkpoint": "imagegen.train.checkpoint", "save_checkpoint": "imagegen.train.checkpoint",
    "EMA": "imagegen.train.ema",
    "TrainConfig": "imagegen.train.config", "TrainRequest": "imagegen.train.config", "TrainingDiverged": "imagegen.train.trainer",
    "lr_factor": "imagegen.train.trainer", "sample_images": "imagegen.train.trainer", "train": "imagegen.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imagegen.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
