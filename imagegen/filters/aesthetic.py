"""Aesthetic score: LAION's predictor, a small MLP on L2-normalised CLIP image embeddings.

Architecture (christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``; the model
behind LAION-Aesthetics V2, e.g. ``sac+logos+ava1-l14-linearMSE.pth``): on CLIP ViT-L/14 (OpenAI)
image embeddings, L2-normalised, ``Linear(768, 1024) - Dropout(0.2) - Linear(1024, 128) -
Dropout(0.2) - Linear(128, 64) - Dropout(0.1) - Linear(64, 16) - Linear(16, 1)``, with no
activations between the layers (they are commented out in the original).  In eval mode dropout is
the identity, so the state dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``.  The earlier
LAION-Aesthetics V1 predictor is a single ``Linear(768, 1)`` (``arch="linear"``, keys
``weight``/``bias``).  Scores are on the AVA 1-10 scale; LAION's subsets keep >= 4.5, 5, 6, 6.5.

Weights are loaded by path from safetensors only; ``convert_checkpoint`` turns the published
``.pth`` state dict into one (read with ``torch.load(weights_only=True)``).  The embedding comes
from the project's open_clip loading (``FilterInput.clip_images``, shared with the CLIP filters):
the predictor only makes sense on the CLIP it was trained on, so a width mismatch is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from imagegen.filters.base import (FilterModelError, cached_model, file_sha256, load_safetensors,
                                   load_state_strict, pass_at_least, read_pickled_tensors, save_tensors)

FORMAT = "imagegen-aesthetic"


class AestheticConfig(BaseModel):
    """LAION aesthetic predictor: keep rows whose predicted score is at least ``min_score``."""

    model_config = ConfigDict(extra="forbid")

    weights: str = Field(description="Predictor weights (.safetensors; convert the published .pth with "
                         "`python -m imagegen.filters convert-aesthetic`)")
    model: str = Field("ViT-L-14:openai", description="open_clip spec of the CLIP whose image embeddings the "
                       "predictor was trained on ('world' = the embedded world's reference CLIP)")
    arch: Literal["mlp", "linear"] = Field("mlp", description="mlp: LAION-Aesthetics V2 (5 linear layers); "
                                           "linear: V1 (one linear layer)")
    min_score: float = Field(5.0, ge=-100, le=100, description="Keep rows scoring at least this (AVA 1-10 scale)")
    batch_size: int = Field(256, ge=1, le=65536)


def build_predictor(arch: str, dim: int) -> Any:
    """The predictor module with random weights: ``mlp`` (V2) or ``linear`` (V1)."""
    import torch.nn as nn

    if arch == "linear":
        return nn.Linear(dim, 1)
    from imagegen.filters.aesthetic_mlp import AestheticMLP

    return AestheticMLP(dim)


def _input_dim(state: dict[str, Any], arch: str, path: Path) -> int:
    key = "weight" if arch == "linear" else "layers.0.weight"
    if key not in state:
        raise FilterModelError(f"aesthetic predictor: {path} has no tensor {key!r} (arch={arch!r}); "
                               f"its tensors are {sorted(state)[:8]}")
    return int(state[key].shape[1])


def load_predictor(weights: str | Path, arch: str) -> tuple[Any, int]:
    """(eval-mode module, input width) from a safetensors file, cached per process."""
    path = Path(weights).expanduser().resolve()

    def build() -> tuple[Any, int]:
        state = load_safetensors(path, "aesthetic predictor")
        dim = _input_dim(state, arch, path)
        module = build_predictor(arch, dim)
        load_state_strict(module, state, "aesthetic predictor", path)
        module.eval()
        module.requires_grad_(False)
        return module, dim

    return cached_model(("aesthetic", str(path), arch, file_sha256(path)), build)


def predict(weights: str | Path, arch: str, embeddings: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Scores of (N, D) image embeddings (re-normalised to unit length, as LAION's inference does)."""
    import torch

    module, dim = load_predictor(weights, arch)
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise FilterModelError(f"aesthetic predictor {weights} takes {dim}-d CLIP image embeddings but got "
                               f"shape {emb.shape}; use the CLIP it was trained on (ViT-L/14: 768-d)")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out = []
    with torch.inference_mode():
        for s in range(0, len(emb), batch_size):
            out.append(module(torch.from_numpy(emb[s:s + batch_size])).reshape(-1).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class AestheticFilter:
    cfg: AestheticConfig
    resolve: Callable[[str], str] = lambda s: s
    name: str = "aesthetic"

    def score(self, data: Any) -> np.ndarray:
        clip, img = data.clip_images(self.resolve(self.cfg.model), self.cfg.batch_size)
        _, dim = load_predictor(self.cfg.weights, self.cfg.arch)
        if img.shape[1] != dim:
            raise FilterModelError(
                f"aesthetic predictor {self.cfg.weights} takes {dim}-d image embeddings, but CLIP "
                f"{self.cfg.model!r} gives {img.shape[1]}-d ones; set filter.aesthetic.model to the CLIP the "
                "predictor was trained on (LAION's: ViT-L-14:openai, 768-d)")
        return predict(self.cfg.weights, self.cfg.arch, img)

    def decide(self, scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return pass_at_least(scores, self.cfg.min_score)

    def identity(self) -> dict[str, Any]:
        return {"weights_sha256": file_sha256(self.cfg.weights), "arch": self.cfg.arch}


# ---------------------------------------------------------------------------- the converter

def convert_checkpoint(src: str | Path, out: str | Path, arch: str | None = None) -> Path:
    """Published predictor (``.pth`` state dict) -> safetensors, checked against the architecture.

    ``arch`` None: ``linear`` when the file holds only ``weight``/``bias``, else ``mlp``."""
    src = Path(src)
    state = read_pickled_tensors(src, "aesthetic checkpoint")
    arch = arch or ("linear" if set(state) <= {"weight", "bias"} else "mlp")
    dim = _input_dim(state, arch, src)
    load_state_strict(build_predictor(arch, dim), state, "aesthetic checkpoint", src)
    return save_tensors(state, out, {"format": FORMAT, "arch": arch, "input_dim": str(dim),
                                     "source_sha256": file_sha256(src)})

