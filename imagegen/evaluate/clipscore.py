"""CLIPScore in both conventions people report, each labelled.

* ``clipscore_hessel2021``: Hessel et al. 2021 ("CLIPScore: A Reference-free Evaluation Metric
  for Image Captioning"): per image ``w * max(cos(E_I, E_C), 0)`` with ``w = 2.5``, then the mean
  over images.
* ``clipscore_torchmetrics``: torchmetrics' ``CLIPScore``.  Its docs write
  ``max(100 * cos(E_I, E_C), 0)``, but its code (``torchmetrics.multimodal.CLIPScore.compute`` and
  ``functional.multimodal.clip_score``) sums ``100 * cos`` over images and clamps the *mean* at
  0: ``max(mean_i 100 * cos_i, 0)``.  We follow the code, so numbers match what torchmetrics
  prints for the same embeddings.

Both are computed from the same cosines; the model spec and weights identity are recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

HESSEL_W = 2.5
DEFINITIONS = {
    "clipscore_hessel2021": "mean_i 2.5 * max(cos_i, 0)  (Hessel et al. 2021)",
    "clipscore_torchmetrics": "max(mean_i 100 * cos_i, 0)  (torchmetrics CLIPScore, clamp on the mean)",
}


def _rows(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
        raise ValueError(f"{name} row {bad} has NaN or inf values")
    norms = np.linalg.norm(a, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{name} row {int(np.flatnonzero(norms == 0)[0])} is all zeros (no direction)")
    return a / norms[:, None]


def clip_score(image_emb: Any, text_emb: Any) -> dict[str, Any]:
    """Both CLIPScore conventions from paired embeddings (row i of each = one image/caption pair).

    Embeddings need not be normalised.  Returns ``cosine`` (per pair, float64 array),
    ``clipscore_hessel2021``, ``clipscore_torchmetrics``, ``cosine_mean``, ``n`` and the
    ``definitions`` of both scores.
    """
    img = _rows("image_emb", image_emb)
    txt = _rows("text_emb", text_emb)
    if img.shape != txt.shape:
        raise ValueError(f"image_emb {img.shape} and text_emb {txt.shape} must have the same shape "
                         f"(one caption per image, same embedding width)")
    cos = (img * txt).sum(axis=1)
    return {
        "n": int(cos.shape[0]),
        "cosine": cos,
        "cosine_mean": float(cos.mean()),
        "clipscore_hessel2021": float(np.mean(HESSEL_W * np.maximum(cos, 0.0))),
        "clipscore_torchmetrics": float(max(np.mean(100.0 * cos), 0.0)),
        "definitions": dict(DEFINITIONS),
    }


def clip_score_images(
    clip_spec: Any,
    images: Sequence[Image.Image | str | Path],
    captions: Sequence[str],
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """CLIPScore of images (PIL images or paths) against their captions with an open_clip model.

    ``clip_spec`` is any spec ``imagegen.clip.load_clip`` takes (the project's one CLIP loading
    path; resolve the "world" alias first).  Adds ``clip`` (spec, weights file and sha256,
    open_clip version) to :func:`clip_score`'s output.
    """
    from imagegen.clip import encode_images, encode_texts, load_clip
    from imagegen.evaluate.images import open_rgb

    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings (one per image), not a single string")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; give one caption per image")
    if not images:
        raise ValueError("clip_score_images: no images")
    pil = [im if isinstance(im, Image.Image) else open_rgb(im) for im in images]
    pil = [im if im.mode == "RGB" else im.convert("RGB") for im in pil]
    clip = load_clip(clip_spec, device)
    img = encode_images(clip, pil, batch_size=batch_size)
    txt = encode_texts(clip, list(captions), batch_size=batch_size)
    out = clip_score(img, txt)
    out["clip"] = dict(clip.identity)
    return out
