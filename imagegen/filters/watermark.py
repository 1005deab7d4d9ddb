"""Watermark classifier loaded by path: a timm or torchvision image classifier in safetensors.

The architecture is named in the config (``timm:NAME`` or ``torchvision:NAME``), built without
pretrained weights, and the file's tensors are loaded into it strictly.  An MLP head can replace
the classifier (``head``: hidden widths with ReLU, ``head_dropout`` per hidden layer), which is how
LAION's detector is built (LAION-AI/LAION-5B-WatermarkDetection, ``example_use.py``): timm
EfficientNet-B3 (``efficientnet_b3a``; timm 1.x names the same layout ``efficientnet_b3``) with
``classifier = Linear(1536, 625) - ReLU - Dropout(0.3) - Linear(625, 256) - ReLU - Linear(256, 2)``,
256x256 input, ImageNet mean/std, P(watermark) = softmax column 0.  See
:meth:`WatermarkConfig.laion`.  The score of a row is the watermark class probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imagegen.filters.base import (FilterModelError, batches, cached_model, file_sha256, load_safetensors,
                                   load_state_strict, pass_below, read_pickled_tensors, save_tensors)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT = "imagegen-watermark"


class WatermarkConfig(BaseModel):
    """Watermark classifier: reject rows whose watermark probability reaches ``threshold``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str = Field(description="Classifier weights (.safetensors; `python -m imagegen.filters "
                         "convert-watermark` converts a .pth state dict)")
    arch: str = Field("timm:efficientnet_b3", description="'timm:NAME' or 'torchvision:NAME' (built with "
                      "random init, then loaded strictly)")
    num_classes: int = Field(2, ge=2, le=100_000)
    head: tuple[int, ...] = Field((), description="Hidden widths of an MLP head replacing the classifier "
                                  "(ReLU after each; timm models only)")
    head_dropout: tuple[float, ...] = Field((), description="Dropout after each hidden layer (0 = none); "
                                            "same length as head, or empty")
    watermark_class: int = Field(0, ge=0, description="Output index of the 'watermark' class")
    image_size: int = Field(256, ge=16, le=2048, description="Images are resized (squashed) to this side")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    threshold: float = Field(0.5, ge=0, le=1, description="Watermark probability at which a row is rejected")
    batch_size: int = Field(32, ge=1, le=4096)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        lib, _, name = v.partition(":")
        if lib not in ("timm", "torchvision") or not name:
            raise ValueError(f"arch must be 'timm:NAME' or 'torchvision:NAME', got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "WatermarkConfig":
        if self.watermark_class >= self.num_classes:
            raise ValueError(f"watermark_class {self.watermark_class} is not < num_classes {self.num_classes}")
        if self.head_dropout and len(self.head_dropout) != len(self.head):
            raise ValueError(f"head_dropout has {len(self.head_dropout)} entries for {len(self.head)} hidden layers")
        if self.head and not self.arch.startswith("timm:"):
            raise ValueError("head replaces a timm classifier; torchvision models keep their own head")
        return self

    @classmethod
    def laion(cls, weights: str, **overrides: Any) -> "WatermarkConfig":
        """LAION-5B-WatermarkDetection's classifier (see the module docstring)."""
        base: dict[str, Any] = dict(arch="timm:efficientnet_b3", num_classes=2, head=(625, 256),
                                    head_dropout=(0.3, 0.0), watermark_class=0, image_size=256)
        return cls(weights=weights, **{**base, **overrides})


def build_classifier(cfg: WatermarkConfig) -> Any:
    """The configured architecture with random weights (nothing is downloaded)."""
    import torch.nn as nn

    lib, _, name = cfg.arch.partition(":")
    if lib == "timm":
        import timm

        try:
            model = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise FilterModelError(f"watermark classifier: timm has no model {name!r} ({exc})") from exc
        if cfg.head:
            path = model.pretrained_cfg.get("classifier") or "classifier"
            parent = model
            *parents, leaf = path.split(".")
            for p in parents:
                parent = getattr(parent, p)
            in_features = int(model.num_features)
            layers: list[Any] = []
            widths = (in_features, *cfg.head)
            drops = cfg.head_dropout or (0.0,) * len(cfg.head)
            for i, width in enumerate(cfg.head):
                layers += [nn.Linear(widths[i], width), nn.ReLU()]
                if drops[i] > 0:
                    layers.append(nn.Dropout(drops[i]))
            layers.append(nn.Linear(widths[-1], cfg.num_classes))
            setattr(parent, leaf, nn.Sequential(*layers))
        return model
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=cfg.num_classes)
    except ValueError as exc:
        raise FilterModelError(f"watermark classifier: torchvision has no model {name!r} ({exc})") from exc


def load_classifier(cfg: WatermarkConfig) -> Any:
    path = Path(cfg.weights).expanduser().resolve()
    shape = cfg.model_dump(include={"arch", "num_classes", "head", "head_dropout"})

    def build() -> Any:
        state = load_safetensors(path, "watermark classifier")
        model = build_classifier(cfg)
        load_state_strict(model, state, "watermark classifier", path)
        model.eval()
        model.requires_grad_(False)
        return model

    return cached_model(("watermark", str(path), file_sha256(path), tuple(sorted(shape.items()))), build)


@dataclass
class WatermarkFilter:
    cfg: WatermarkConfig
    name: str = "watermark_classifier"

    def probabilities(self, images: list[Any]) -> np.ndarray:
        import torch

        model = load_classifier(self.cfg)
        mean = torch.tensor(self.cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
        side = self.cfg.image_size
        out = []
        with torch.inference_mode():
            for _, chunk in batches(images, self.cfg.batch_size):
                from PIL import Image

                arr = np.stack([np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR),
                                           dtype=np.float32) for im in chunk]) / 255.0
                x = (torch.from_numpy(arr).permute(0, 3, 1, 2) - mean) / std
                p = torch.softmax(model(x).float(), dim=1)[:, self.cfg.watermark_class]
                out.append(p.double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, data: Any) -> np.ndarray:
        return self.probabilities(data.images)

    def decide(self, scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return pass_below(scores, self.cfg.threshold)

    def identity(self) -> dict[str, Any]:
        return {"weights_sha256": file_sha256(self.cfg.weights)}


def convert_checkpoint(src: str | Path, out: str | Path, cfg: WatermarkConfig) -> Path:
    """A ``.pth`` state dict (e.g. LAION's ``watermark_model_v1.pt``) -> safetensors, checked
    against ``cfg``'s architecture.  Read with ``torch.load(weights_only=True)``."""
    src = Path(src)
    state = read_pickled_tensors(src, "watermark checkpoint")
    load_state_strict(build_classifier(cfg), state, "watermark checkpoint", src)
    return save_tensors(state, out, {"format": FORMAT, "arch": cfg.arch, "source_sha256": file_sha256(src)})
