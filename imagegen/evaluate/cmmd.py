"""CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image
Generation"): the maximum mean discrepancy between CLIP image embeddings of two sets.

Kernel: Gaussian RBF ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))`` with ``sigma = 10`` on
L2-normalised CLIP image embeddings (the paper uses CLIP ViT-L/14 at 336 px), reported scaled by
1000.  Two estimators, labelled in the result:

* ``"unbiased"`` (the default; the paper calls MMD's estimator unbiased): the U-statistic
  ``MMD^2_u = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1))
  - 2 sum_{i,j} k(x_i,y_j) / (m n)``; a set against an independent sample of the same
  distribution averages 0 and can come out slightly negative.
* ``"reference"``: the published code's form (its ``distance.py`` averages the kernel over *all*
  pairs, diagonal included: the biased V-statistic), for numbers comparable with that code.

Embeddings come from any open_clip model through :mod:`imagegen.clip` (its loading path and its
preprocessing: shortest side resized to the model's input size, centre crop, the model's
mean/std), and the model's identity (spec, weights sha256) is recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

SIGMA = 10.0
SCALE = 1000.0
Estimator = Literal["unbiased", "reference"]


def _emb(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a (samples >= 2, dims) array of embeddings, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or inf (first in row {int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])})")
    return a


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def mmd2_rbf(x: Any, y: Any, sigma: float = SIGMA, estimator: Estimator = "unbiased") -> float:
    """Squared MMD with the Gaussian RBF kernel of bandwidth ``sigma`` (unscaled), float64."""
    a, b = _emb("x", x), _emb("y", y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y differ in embedding width: {a.shape[1]} vs {b.shape[1]}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    kxx, kyy, kxy = (np.exp(-gamma * _sqdist(p, q)) for p, q in ((a, a), (b, b), (a, b)))
    m, n = a.shape[0], b.shape[0]
    if estimator == "unbiased":
        xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    elif estimator == "reference":
        xx, yy = kxx.mean(), kyy.mean()
    else:
        raise ValueError(f"unknown estimator {estimator!r}; choose 'unbiased' or 'reference'")
    return float(xx + yy - 2.0 * kxy.mean())


def cmmd(x_emb: Any, y_emb: Any, *, sigma: float = SIGMA, scale: float = SCALE,
         estimator: Estimator = "unbiased") -> float:
    """CMMD between two sets of CLIP image embeddings: ``scale * MMD^2`` (1000 x, as the paper).

    Embeddings are L2-normalised here (as the paper's CLIP embeddings are), so raw
    ``encode_image`` outputs can be passed.
    """
    a, b = _emb("x_emb", x_emb), _emb("y_emb", y_emb)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return scale * mmd2_rbf(a, b, sigma=sigma, estimator=estimator)


def clip_embeddings(clip_spec: Any, images: Sequence[Image.Image | str | Path], *, batch_size: int = 64,
                    device: str = "cpu") -> tuple[np.ndarray, dict[str, Any]]:
    """L2-normalised CLIP image embeddings (float32, input order) and the model's identity.

    Images (PIL or paths) are opened one batch at a time, so a large set is never all in memory.
    """
    from imagegen.clip import encode_images, load_clip
    from imagegen.evaluate.images import open_rgb

    if not len(images):
        raise ValueError("clip_embeddings: no images")
    clip = load_clip(clip_spec, device)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [im.convert("RGB") if isinstance(im, Image.Image) else open_rgb(im)
                 for im in images[start:start + batch_size]]
        out.append(encode_images(clip, chunk, batch_size=batch_size))
    return np.concatenate(out), dict(clip.identity)


def cmmd_images(clip_spec: Any, generated: Sequence[Image.Image | str | Path],
                reference: Sequence[Image.Image | str | Path], *, estimator: Estimator = "unbiased",
                batch_size: int = 64, device: str = "cpu") -> dict[str, Any]:
    """CMMD of two image sets with an open_clip model: value, estimator, sigma, scale, counts, model."""
    gen, ident = clip_embeddings(clip_spec, generated, batch_size=batch_size, device=device)
    ref, _ = clip_embeddings(clip_spec, reference, batch_size=batch_size, device=device)
    return {"metric": "CMMD", "value": cmmd(gen, ref, estimator=estimator), "estimator": estimator,
            "sigma": SIGMA, "scale": SCALE, "n_generated": int(gen.shape[0]), "n_reference": int(ref.shape[0]),
            "clip": ident, "embeddings": {"generated": gen, "reference": ref}}
