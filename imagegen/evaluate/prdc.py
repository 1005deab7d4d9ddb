"""Precision / recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", k = 3) and density / coverage (Naeem et al. 2020, "Reliable Fidelity
and Diversity Metrics for Generative Models") on any extractor's features.

With ``NND_k(x)`` the distance from ``x`` to its k-th nearest neighbour within its own set
(itself excluded) and ``B(x, r)`` the ball of radius ``r`` around ``x``:

* precision = fraction of generated samples inside at least one ``B(real_i, NND_k(real_i))``;
* recall    = fraction of real samples inside at least one ``B(fake_j, NND_k(fake_j))``;
* density   = ``1/(k M) sum_j sum_i 1[fake_j in B(real_i, NND_k(real_i))]`` (counts how many real
  balls hold each generated sample; about 1 when both sets come from one distribution);
* coverage  = fraction of real samples whose nearest generated sample lies inside their own ball.

Balls are open (distance strictly below the radius), as the ``prdc`` package of Naeem et al.
computes them; the two conventions differ only for exact ties (duplicated samples).  Distances are
Euclidean in float64, computed in row blocks so that no full N x M matrix is held for large sets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NEAREST_K = 3


def _feats(name: str, x: Any, k: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, dims) array, got shape {a.shape}")
    if a.shape[0] <= k:
        raise ValueError(f"{name} has {a.shape[0]} samples; k-NN radii with k={k} need at least {k + 1}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or inf (first in row {int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])})")
    return a


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d, 0.0))


def knn_radii(x: np.ndarray, k: int = NEAREST_K, block: int = 2048) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row (the row itself excluded)."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], block):
        d = _dist(x[s:s + block], x)
        d[np.arange(d.shape[0]), np.arange(s, s + d.shape[0])] = np.inf  # not its own neighbour
        out[s:s + block] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def prdc(real: Any, fake: Any, k: int = NEAREST_K, *, block: int = 2048) -> dict[str, Any]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features (k-NN radii)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = _feats("real", real, k)
    f = _feats("fake", fake, k)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake differ in feature width: {r.shape[1]} vs {f.shape[1]}")
    r_rad = knn_radii(r, k, block)
    f_rad = knn_radii(f, k, block)
    in_real_balls = np.zeros(f.shape[0], dtype=np.int64)  # per fake: how many real balls hold it
    recall_hit = np.zeros(r.shape[0], dtype=bool)
    covered = np.zeros(r.shape[0], dtype=bool)
    for s in range(0, r.shape[0], block):
        d = _dist(r[s:s + block], f)  # rows: real, columns: fake
        inside = d < r_rad[s:s + block, None]
        in_real_balls += inside.sum(axis=0)
        recall_hit[s:s + block] = (d < f_rad[None, :]).any(axis=1)
        covered[s:s + block] = d.min(axis=1) < r_rad[s:s + block]
    return {"precision": float((in_real_balls > 0).mean()), "recall": float(recall_hit.mean()),
            "density": float(in_real_balls.sum() / (k * f.shape[0])), "coverage": float(covered.mean()),
            "k": int(k), "n_real": int(r.shape[0]), "n_fake": int(f.shape[0])}
