"""The generic trainer (one loop for every model family), its EMA and its checkpoints."""

from __future__ import annotations

from imagegen.train.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                       read_checkpoint, save_checkpoint)
from imagegen.train.ema import EMA
from imagegen.train.trainer import TrainConfig, TrainingDiverged, lr_factor, sample_images, train

__all__ = ["EMA", "CheckpointError", "TrainConfig", "TrainingDiverged", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "lr_factor", "read_checkpoint", "sample_images", "save_checkpoint", "train"]
