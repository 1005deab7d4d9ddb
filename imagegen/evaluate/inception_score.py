"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs") from clean-fid's
Inception network.

``IS = exp(E_x KL(p(y|x) || p(y)))``, computed per split of the generated set with ``p(y)`` the
split's mean class distribution; the result is the mean and the (population) std over 10
contiguous splits, as in StyleGAN2-ADA's ``metrics/inception_score.py`` and torch-fidelity's
``isc``.  The class probabilities are the softmax of the 1008 logits of the TF-Inception port that
clean-fid loads (``inception-2015-12-05.pt``), *without* the output layer's bias: the original
TensorFlow implementation's quirk, which StyleGAN2-ADA (``no_output_bias=True``) and
torch-fidelity (``logits_unbiased``) reproduce.

The network input is clean-fid's data path (its resize mode to 299x299, then ``(x - 128) / 128``
as clean-fid's ``InceptionV3W`` does), so IS shares FID's preprocessing.  Without the weights the
call is refused before any work with the file name, the URL and where to put it
(:func:`imagegen.evaluate.fid.check_inception_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = 10


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score_from_probs(probs: Any, splits: int = SPLITS, *, eps: float = 1e-12) -> tuple[float, float]:
    """``(mean, std)`` of ``exp(mean_i KL(p_i || mean_split p))`` over ``splits`` contiguous splits.

    Split ``s`` holds rows ``s*N//splits : (s+1)*N//splits`` (every row is used).  ``eps`` guards
    log(0) only; rows must be probability vectors.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"probs must be an (N, classes) array, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs has NaN, inf or negative entries")
    if np.abs(p.sum(axis=1) - 1.0).max() > 1e-4:
        raise ValueError("probs rows must sum to 1 (pass logits to inception_score_from_logits)")
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be between 1 and the number of images ({n}), got {splits}")
    scores = []
    for s in range(splits):
        part = p[s * n // splits:(s + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + eps) - np.log(py + eps))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_logits(logits: Any, splits: int = SPLITS) -> tuple[float, float]:
    """:func:`inception_score_from_probs` of ``softmax(logits)`` (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be an (N, classes) array, got shape {z.shape}")
    return inception_score_from_probs(_softmax(z), splits)


class InceptionLogits(torch.nn.Module):
    """clean-fid's TF-Inception torchscript as a custom clean-fid extractor returning the unbiased
    1008 logits: ``[B, 3, 299, 299]`` in 0..255 -> ``(x - 128) / 128`` -> ``layers`` (2048-d pool) ->
    ``features @ output.weight.T`` (no bias)."""

    input_size = None  # clean-fid's own resize for the mode (299x299), as for FID

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base
        self.extractor_id = "inception-logits-unbiased"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 299, 299):
            raise ValueError(f"InceptionLogits takes [B, 3, 299, 299] images in 0..255, got {tuple(x.shape)}")
        feats = self.base.layers.forward((x.float() - 128.0) / 128.0).reshape(x.shape[0], 2048)
        return F.linear(feats, self.base.output.weight)


def load_inception_logits(mode: str = "clean", device: str = "cpu", *, download: bool = True) -> InceptionLogits:
    """The logits network from the weights file clean-fid uses for ``mode`` (checked first)."""
    from imagegen.evaluate.fid import check_inception_weights

    if mode == "legacy_pytorch":
        raise ValueError("Inception Score uses the TF-Inception torchscript of modes 'clean' / "
                         "'legacy_tensorflow'; legacy_pytorch's pytorch-fid weights have no 1008-way output")
    path = check_inception_weights(mode, download=download)
    base = torch.jit.load(str(path), map_location=device).eval()
    return InceptionLogits(base).to(device).eval()


def inception_score(images: str | Path | Sequence[str | Path], *, mode: str = "clean", splits: int = SPLITS,
                    batch_size: int = 64, num_workers: int | None = None, device: str = "cpu",
                    download: bool = True, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Inception Score of a folder (or list) of images through clean-fid's data path.

    Returns ``{"metric": "IS", "mean", "std", "splits", "n", "mode", "weights"}``; ``weights`` names
    the Inception file and its sha256.  ``model`` replaces the network (anything with the
    InceptionLogits interface; the benchmarks use it), in which case ``weights`` is None.
    """
    from imagegen.evaluate.fid import clean_fid_features, inception_weights
    from imagegen.hashing import file_sha256

    weights = None
    if model is None:
        model = load_inception_logits(mode, device, download=download)
        path, url = inception_weights(mode)
        weights = {"file": str(path), "url": url, "sha256": file_sha256(path)}
    logits = clean_fid_features(images, mode=mode, model=model, batch_size=batch_size, num_workers=num_workers,
                                device=device)
    mean, std = inception_score_from_logits(logits, splits)
    return {"metric": "IS", "mean": mean, "std": std, "splits": int(splits), "n": int(logits.shape[0]),
            "mode": mode, "weights": weights, "logits": logits}
