"""The reference CLIP's configuration (size, schedule, seed, threads) and id: plain pydantic, no torch.

``imagegen.curate`` (and so the ``imagegen curate`` command line and every curate flow run) reads
it to validate a request, and computes the model's id here (``reference_clip_id``), so a curate
that finds the model trained imports neither torch nor open_clip; training it
(``imagegen.world.reference_clip``, which re-exports both) imports them only then.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.hashing import code_version, module_source, stable_hash
from imagegen.world import scene as scene_mod
from imagegen.world.scene import WorldConfig

TRAINER = "imagegen.world.reference_clip"  # the module that trains it (torch, open_clip)


class ReferenceClipConfig(BaseModel):
    """Size and schedule of the reference CLIP (its measured cost and accuracy: docs/DESIGN.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_train: int = Field(4000, ge=32, le=200_000, description="training scenes")
    n_heldout: int = Field(500, ge=20, le=50_000, description="held-out scenes for the metrics")
    steps: int = Field(800, ge=1, le=1_000_000, description="optimiser steps")
    batch_size: int = Field(64, ge=4, le=8192, description="pairs per step (distinct captions)")
    lr: float = Field(2e-3, gt=0, le=1.0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0, le=10, description="AdamW decay on weight matrices")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps before the cosine")
    seed: int = Field(0, ge=0, description="init / data-order seed (also derives the data world)")
    embed_dim: int = Field(128, ge=8, le=1024, description="joint embedding width")
    vision_arch: Literal["vit", "resnet"] = Field(
        "resnet", description="image tower: open_clip VisionTransformer or ModifiedResNet (CLIP RN)"
    )
    resnet_layers: tuple[int, int, int, int] = Field(
        (1, 1, 1, 1), description="ModifiedResNet blocks per stage (vision_arch='resnet')"
    )
    patch_size: int = Field(8, ge=2, le=64, description="ViT patch side in pixels")
    vision_width: int = Field(
        16, ge=8, le=1024, description="ResNet base width (stage 1; x32 at the end) or ViT width"
    )
    vision_layers: int = Field(3, ge=1, le=24, description="ViT blocks")
    text_width: int = Field(64, ge=16, le=1024, description="text transformer width")
    text_layers: int = Field(2, ge=1, le=24, description="text transformer blocks")
    head_width: int = Field(32, ge=8, le=256, description="attention head width (both towers)")
    vision_pool: Literal["tok", "avg"] = Field(
        "avg", description="ViT image feature: class token ('tok') or mean of patch tokens ('avg')"
    )
    token_init_std: float = Field(
        0.1, gt=0, le=1.0, description="std of the initial token embeddings (open_clip: 0.02); "
        "world captions share most tokens, and at 0.02 the text tower starts with near-identical "
        "outputs for all of them and often stays collapsed"
    )
    init_temperature: float = Field(
        0.07, gt=0.01, le=1.0, description="initial softmax temperature (CLIP: 0.07)"
    )
    context_length: int = Field(32, ge=8, le=77, description="text tokens incl. start/end")
    hflip: bool = Field(True, description="mirror images (left/right captions swapped to match)")
    swap_order: bool = Field(
        True, description="also train on the equivalent caption with the two objects swapped"
    )
    eval_candidates: int = Field(100, ge=2, le=10_000, description="captions per candidate set")
    threads: int = Field(
        1, ge=1, le=256, description="torch threads; part of the model id, because CPU float "
        "reductions round differently at each thread count (imagegen.determinism)"
    )

    @model_validator(mode="after")
    def _check(self) -> ReferenceClipConfig:
        # Attention widths: ViT width, text width, and the ResNet's attention pool (32 x width).
        widths = {"text_width": self.text_width}
        if self.vision_arch == "vit":
            widths["vision_width"] = self.vision_width
        else:
            widths["32 x vision_width"] = 32 * self.vision_width
        for name, width in widths.items():
            if width % self.head_width:
                raise ValueError(f"{name} ({width}) must be a multiple of "
                                 f"head_width ({self.head_width})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        return self

    @classmethod
    def smoke(cls, **overrides: Any) -> ReferenceClipConfig:
        """Half the data, 300 steps: ~40 s on 2 cores (~80 s on 1)."""
        base: dict[str, Any] = dict(n_train=2000, n_heldout=300, steps=300, warmup_steps=30)
        return cls(**{**base, **overrides})

    def id_fields(self) -> dict[str, Any]:
        return self.model_dump()  # every field, threads included: each one can change the weights


def reference_clip_id(world_cfg: WorldConfig, clip_cfg: ReferenceClipConfig) -> str:
    """Content id: both configs, the source of the trainer module (read, not imported), of this
    module and of the world's scene code, and open_clip's version (from its installed metadata)."""
    return stable_hash({
        "world": world_cfg,
        "clip": clip_cfg.id_fields(),
        "code": code_version(module_source(TRAINER), sys.modules[__name__], scene_mod),
        "open_clip": importlib.metadata.version("open_clip_torch"),
    })
