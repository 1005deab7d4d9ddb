"""Uncertainty for every metric row: bootstrap confidence intervals and sample-count checks.

* :func:`bootstrap_ci` resamples the generated set (rows drawn with replacement, seeded) and, for
  two-set metrics such as FD, KID, CMMD or precision/recall, the reference set too, recomputes
  the metric ``n_resamples`` times and reports the percentile interval (Efron & Tibshirani 1993,
  "An Introduction to the Bootstrap", ch. 13) next to the value on the full sets.
* :func:`bootstrap_mean_ci` is the same for per-image scores (CLIPScore, rewards, GenEval's
  per-image correctness, DPG-Bench per prompt), vectorised.
* :func:`sample_count_flags` says when a set is too small for what a metric needs (FD with fewer
  samples than the feature dimension; KID subsets larger than a set; k-NN metrics with fewer
  than k + 1 samples; IS splits of fewer than ~2 images), and how many are needed; each flag is
  also emitted as a :class:`~imagegen.evaluate.fid.SmallSampleWarning` by :func:`warn_sample_counts`.

What the interval means.  It is the spread of the *finite-n estimate* under resampling.  For an
unbiased statistic (a mean, KID's and CMMD's unbiased MMD^2) it covers the population value at
about the stated rate (the tests check that on synthetic data).  FD is biased upward at finite n
and resampling with replacement duplicates rows (which lowers the rank of the covariance), so an
FD interval says how much the number moves with the sample, not where the infinite-sample FD
lies: compare FDs only at equal n.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from imagegen.evaluate.fid import SmallSampleWarning

DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    """A metric value with its bootstrap percentile interval and how it was obtained."""

    value: float
    low: float
    high: float
    std: float
    confidence: float
    n_resamples: int
    method: str
    seed: int
    n_generated: int
    n_reference: int | None
    resampled: str  # "generated", "generated+reference"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def _check(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be >= 2, got {n_resamples}")


def _percentiles(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    finite = estimates[np.isfinite(estimates)]
    if finite.size < estimates.size:
        raise ValueError(f"{estimates.size - finite.size} of {estimates.size} bootstrap resamples gave a "
                         f"non-finite metric; the sets are too small for this metric")
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray | None], float],
    generated: Any,
    reference: Any | None = None,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
    resample_reference: bool = True,
    value: float | None = None,
) -> Interval:
    """Percentile bootstrap interval of ``metric(generated, reference)``.

    ``generated`` / ``reference`` are arrays whose first axis is the sample (features, scores).
    Each resample draws ``len(generated)`` rows of ``generated`` with replacement and, when a
    reference is given and ``resample_reference``, ``len(reference)`` rows of it, from one seeded
    generator (the same ``seed`` gives the same interval).  ``value`` is the metric on the full
    sets (computed when not given).  Warnings from the resampled metric (e.g. a singular
    covariance) are raised once, not ``n_resamples`` times.
    """
    _check(confidence, n_resamples)
    gen = np.asarray(generated)
    ref = None if reference is None else np.asarray(reference)
    if gen.shape[0] < 2:
        raise ValueError(f"bootstrap needs at least 2 generated samples, got {gen.shape[0]}")
    full = float(metric(gen, ref)) if value is None else float(value)
    rng = np.random.default_rng(seed)
    est = np.empty(n_resamples, dtype=np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in range(n_resamples):
            g = gen[rng.integers(0, gen.shape[0], gen.shape[0])]
            r = ref
            if ref is not None and resample_reference:
                r = ref[rng.integers(0, ref.shape[0], ref.shape[0])]
            est[b] = float(metric(g, r))
    for msg in {str(w.message): w for w in caught}.values():
        warnings.warn(f"(in bootstrap resamples) {msg.message}", msg.category, stacklevel=2)
    lo, hi = _percentiles(est, confidence)
    both = ref is not None and resample_reference
    return Interval(value=full, low=lo, high=hi, std=float(est.std(ddof=1)), confidence=confidence,
                    n_resamples=n_resamples, method="percentile", seed=seed, n_generated=int(gen.shape[0]),
                    n_reference=None if ref is None else int(ref.shape[0]),
                    resampled="generated+reference" if both else "generated")


def bootstrap_mean_ci(
    values: Any, *, n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0,
    chunk: int = 256,
) -> Interval:
    """Percentile bootstrap interval of the mean of per-sample scores (vectorised in chunks)."""
    _check(confidence, n_resamples)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        raise ValueError(f"bootstrap needs at least 2 values, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError(f"values has NaN or inf (first at index {int(np.flatnonzero(~np.isfinite(v))[0])})")
    rng = np.random.default_rng(seed)
    est = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        est[start:start + m] = v[rng.integers(0, v.size, (m, v.size))].mean(axis=1)
    lo, hi = _percentiles(est, confidence)
    return Interval(value=float(v.mean()), low=lo, high=hi, std=float(est.std(ddof=1)), confidence=confidence,
                    n_resamples=n_resamples, method="percentile", seed=seed, n_generated=int(v.size),
                    n_reference=None, resampled="generated")


# ------------------------------------------------------------------------------ sample counts


def sample_count_flags(kind: str, n_generated: int, n_reference: int | None = None, *,
                       dim: int | None = None, subset_size: int | None = None, k: int | None = None,
                       splits: int | None = None) -> list[str]:
    """Why the sample counts are too small for a metric of ``kind`` (empty list: they are enough).

    kinds: ``"fd"`` (needs more samples than feature dimensions in each set, ``dim`` required),
    ``"kid"`` (``subset_size`` must fit in both sets), ``"knn"`` (precision/recall/density/coverage:
    more than ``k`` samples per set), ``"is"`` (at least 2 images per split), ``"mmd"`` (>= 2 per set).
    """
    flags: list[str] = []
    sets = [("generated", n_generated)] + ([("reference", n_reference)] if n_reference is not None else [])
    if kind == "fd":
        if dim is None:
            raise ValueError("sample_count_flags('fd') needs dim (the feature dimension)")
        for name, n in sets:
            if n <= dim:
                flags.append(f"{name} set: {n} samples of {dim}-d features give a singular covariance; at least "
                             f"{dim + 1} are needed (and FD is biased upward at small n: compare only equal n; "
                             f"thousands are usual, 10k-50k for 2048-d Inception)")
    elif kind == "kid":
        if subset_size is None:
            raise ValueError("sample_count_flags('kid') needs subset_size")
        for name, n in sets:
            if n < subset_size:
                flags.append(f"{name} set: {n} samples but KID subsets of {subset_size} were asked for; the subset is "
                             f"capped at {n} (at least {subset_size} samples are needed for that subset size)")
    elif kind == "knn":
        kk = 3 if k is None else k
        for name, n in sets:
            if n <= kk:
                flags.append(f"{name} set: {n} samples; k-NN radii with k={kk} need at least {kk + 1}")
    elif kind == "is":
        s = 10 if splits is None else splits
        if n_generated < 2 * s:
            flags.append(f"generated set: {n_generated} images in {s} splits; at least {2 * s} are needed "
                         f"(50k is the usual count for Inception Score)")
    elif kind == "mmd":
        for name, n in sets:
            if n < 2:
                flags.append(f"{name} set: {n} samples; the unbiased MMD needs at least 2")
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from fd, kid, knn, is, mmd")
    return flags


def warn_sample_counts(kind: str, n_generated: int, n_reference: int | None = None, **kwargs: Any) -> list[str]:
    """:func:`sample_count_flags`, each flag also warned as a SmallSampleWarning; returns the flags."""
    flags = sample_count_flags(kind, n_generated, n_reference, **kwargs)
    for f in flags:
        warnings.warn(f"{kind}: {f}", SmallSampleWarning, stacklevel=2)
    return flags
