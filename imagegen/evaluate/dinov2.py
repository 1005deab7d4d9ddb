"""FD-DINOv2: the Fréchet distance on DINOv2 image features (Stein et al. 2023, "Exposing flaws of
generative model evaluation metrics and their unfair treatment of diffusion models", who recommend
DINOv2-ViT-L/14 over Inception after 41 models and human raters).

The network is transformers' ``Dinov2Model`` by hub name (``facebook/dinov2-large`` is ViT-L/14)
or by a local ``save_pretrained`` folder (offline), loaded safetensors-only through
:mod:`imagegen.evaluate.hf_models`.  The feature is the CLS token after the final layer norm
(``pooler_output``), which is what the torch-hub model's ``forward`` returns
(``x_norm_clstoken``) and what dgm-eval takes (1024-d for ViT-L/14).

Preprocessing follows the dgm-eval reference (layer6ai-labs/dgm-eval, ``dgm_eval/models/dinov2.py``,
``DINOv2Encoder.transform``): resize to 224 x 224 with PIL bicubic (torchvision ``Resize((224,
224), BICUBIC)`` on a PIL image), ``ToTensor`` (0..1), then ``Normalize`` with the ImageNet mean
``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)``; no centre crop.  Images go through
clean-fid's data path (:func:`imagegen.evaluate.fid.clean_fid_features`) with this extractor as a
custom model whose ``input_size`` is 224: clean-fid then resizes the uint8 image with PIL bicubic
along its shortest side and centre-crops, which for square images (every evaluation set here) is
exactly dgm-eval's 224 x 224 resize.  Non-square images are centre-cropped instead of squashed:
the one difference, stated in the result's ``preprocessing``.

Features are returned as float64 and the distance is the project's Fréchet distance
(:func:`imagegen.evaluate.fid.fd_from_features`); the weights' sha256 is recorded.  With fewer
samples than the feature dimension (1024 for ViT-L/14) the covariance is singular:
:func:`imagegen.evaluate.fid.gaussian_stats` warns and says how many are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
DEFAULT_MODEL = "facebook/dinov2-large"  # ViT-L/14, the network Stein et al. recommend
PREPROCESSING = ("dgm-eval DINOv2: PIL bicubic resize to 224x224 (clean-fid data path: shortest side to 224, "
                 "centre crop; identical for square images), ToTensor, ImageNet mean/std normalisation; "
                 "feature = CLS token after the final layer norm")


class Dinov2Extractor(torch.nn.Module):
    """DINOv2 as a clean-fid custom extractor: ``[B, 3, 224, 224]`` in 0..255 -> CLS features (float32).

    ``extractor_id`` names it for reference-statistics caches and metric names
    (``FD-DINOv2-<model>``); ``identity`` holds the config and weights sha256.
    """

    def __init__(self, model_name_or_path: str | Path = DEFAULT_MODEL, device: str = "cpu",
                 input_size: int = INPUT_SIZE, *, model: Any = None, name: str | None = None) -> None:
        from imagegen.evaluate.fid import metric_name
        from imagegen.evaluate.hf_models import load_pretrained, weights_identity

        super().__init__()
        if model is not None:  # an instance in memory (benchmarks): named by the caller, no weights file
            if not name:
                raise ValueError("Dinov2Extractor(model=...) needs name= (its weights have no file to hash)")
            self.model = model.eval().to(device).requires_grad_(False)
            self.identity = {"model": name, "weights": None}
            base = name
        else:
            from transformers import Dinov2Model

            self.model = load_pretrained(Dinov2Model, model_name_or_path, what="DINOv2 weights", device=device)
            self.identity = weights_identity(model_name_or_path)
            p = Path(str(model_name_or_path)).expanduser()
            if p.is_dir():
                base = f"{p.name}-{next(iter(self.identity['weights'].values()), '')[:12]}"
            else:
                base = str(model_name_or_path).replace("/", "-")
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device))
        self.identity["preprocessing"] = PREPROCESSING
        self.feature_dim = int(self.model.config.hidden_size)
        self.extractor_id = f"DINOv2-{base}"
        self.name = metric_name(self.extractor_id)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Dinov2Extractor takes [B, 3, H, W] images in 0..255, got shape {tuple(x.shape)}")
        x = x.to(self.mean.device, torch.float32)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"Dinov2Extractor expects {self.input_size}x{self.input_size} inputs (clean-fid resizes "
                             f"to its input_size first), got {tuple(x.shape[-2:])}")
        x = (x / 255.0 - self.mean) / self.std
        return self.model(pixel_values=x).pooler_output.float()


def dinov2_extractor(model_name_or_path: str | Path = DEFAULT_MODEL, device: str = "cpu") -> Dinov2Extractor:
    return Dinov2Extractor(model_name_or_path, device).eval()


def dinov2_features(images: str | Path | Sequence[str | Path], extractor: Dinov2Extractor, *, batch_size: int = 64,
                    num_workers: int | None = None, device: str = "cpu") -> np.ndarray:
    """float64 ``(N, D)`` DINOv2 features of a folder (recursive, sorted) or a list of image files."""
    from imagegen.evaluate.fid import clean_fid_features

    feats = clean_fid_features(images, mode="clean", model=extractor, batch_size=batch_size,
                               num_workers=num_workers, device=device)
    return np.asarray(feats, dtype=np.float64)


def fd_dinov2(generated: str | Path | Sequence[str | Path], reference: str | Path | Sequence[str | Path] | Any,
              model_name_or_path: str | Path = DEFAULT_MODEL, *, batch_size: int = 64, num_workers: int | None = None,
              device: str = "cpu", extractor: Dinov2Extractor | None = None) -> dict[str, Any]:
    """FD-DINOv2 between two image sets (folders or file lists); ``reference`` may also be an
    ``(N, D)`` feature array (e.g. cached).  Returns the value, the metric name, sample counts,
    the feature dimension, the preprocessing, the weights' identity, ``flags`` (sample counts
    below what FD needs, :func:`imagegen.evaluate.bootstrap.sample_count_flags`); ``features`` holds both
    feature arrays (for bootstrap intervals and precision/recall on the same features)."""
    from imagegen.evaluate.bootstrap import sample_count_flags
    from imagegen.evaluate.fid import fd_from_features

    ext = extractor or dinov2_extractor(model_name_or_path, device)
    gen = dinov2_features(generated, ext, batch_size=batch_size, num_workers=num_workers, device=device)
    if isinstance(reference, np.ndarray):
        ref = np.asarray(reference, dtype=np.float64)
    else:
        ref = dinov2_features(reference, ext, batch_size=batch_size, num_workers=num_workers, device=device)
    return {"metric": ext.name, "value": fd_from_features(gen, ref), "n_generated": int(gen.shape[0]),
            "n_reference": int(ref.shape[0]), "feature_dim": ext.feature_dim, "extractor_id": ext.extractor_id,
            "preprocessing": PREPROCESSING, "weights": ext.identity,
            "flags": sample_count_flags("fd", int(gen.shape[0]), int(ref.shape[0]), dim=ext.feature_dim),
            "features": {"generated": gen, "reference": ref}}
