"""The interval and sample-count columns every metric row of an evaluation carries.

Each compute function of the metric table (:mod:`imagegen.evaluate.metrics`) adds to its rows:

* ``ci_low``, ``ci_high``, ``ci_std``, ``ci_confidence``, ``n_resamples``, ``ci_method``,
  ``ci_resampled``: a percentile bootstrap (:mod:`imagegen.evaluate.bootstrap`) over the generated
  set, and over the reference set too for two-set metrics (FD, KID, CMMD, precision/recall);
  ``n_resamples = 0`` in the request: no interval (the columns say so);
* ``flags`` (a JSON list) and ``flagged``: sample counts below what the metric needs, each also
  warned as a :class:`~imagegen.evaluate.fid.SmallSampleWarning`, saying how many are needed.

Evaluations over several seeds (``n_seeds > 1``) combine per-seed values with :func:`over_seeds`:
mean, std (ddof=1) and a Student-t interval of the mean.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from imagegen.evaluate.bootstrap import Interval, bootstrap_ci, bootstrap_mean_ci

KID_RESAMPLE_SUBSETS = 10  # KID inside bootstrap resamples: 10 subsets each (100 x 100 subsets would be 10^4 MMDs)


def _columns(iv: Interval, method: str | None = None) -> dict[str, Any]:
    return {"ci_low": iv.low, "ci_high": iv.high, "ci_std": iv.std, "ci_confidence": iv.confidence,
            "n_resamples": iv.n_resamples, "ci_method": method or f"{iv.method} bootstrap", "ci_resampled": iv.resampled}


def _none(req: Any, why: str) -> dict[str, Any]:
    return {"ci_low": None, "ci_high": None, "ci_std": None, "ci_confidence": req.confidence, "n_resamples": 0,
            "ci_method": why, "ci_resampled": None}


def interval_columns(generated: Any, reference: Any | None, req: Any, *, kind: str = "mean",
                     metric: Callable[[np.ndarray, np.ndarray | None], float] | None = None,
                     value: float | None = None, method: str | None = None) -> dict[str, Any]:
    """The interval columns of one row.

    kinds: ``"mean"`` (``generated`` = per-image scores), ``"fd"`` (features of both sets),
    ``"metric"`` (``metric(generated, reference)`` on arrays whose first axis is the sample).
    """
    if req.n_resamples == 0:
        return _none(req, "none (n_resamples=0)")
    n = len(generated)
    if n < 2:
        return _none(req, f"none ({n} sample(s): a bootstrap needs at least 2)")
    with warnings.catch_warnings():  # the value's own warning was raised already; not once more per resample
        warnings.simplefilter("ignore")
        if kind == "mean":
            iv = bootstrap_mean_ci(generated, n_resamples=req.n_resamples, confidence=req.confidence, seed=req.seed)
        else:
            if kind == "fd":
                from imagegen.evaluate.fid import fd_from_features

                metric = fd_from_features
            if metric is None:
                raise ValueError(f"interval_columns(kind={kind!r}) needs metric=")
            try:
                iv = bootstrap_ci(metric, generated, reference, n_resamples=req.n_resamples,
                                  confidence=req.confidence, seed=req.seed, value=value)
            except (ValueError, np.linalg.LinAlgError) as e:
                return _none(req, f"none (the resampled metric failed: {e})")
    return _columns(iv, method)


def rows_bootstrap(rows: Sequence[Any], metric: Callable[[list[Any]], float], req: Any,
                   value: float) -> dict[str, Any]:
    """Interval of ``metric(rows)`` over resamples of the rows (e.g. GenEval's per-image results)."""
    if req.n_resamples == 0:
        return _none(req, "none (n_resamples=0)")
    if len(rows) < 2:
        return _none(req, f"none ({len(rows)} row(s): a bootstrap needs at least 2)")
    rng = np.random.default_rng(req.seed)
    est = np.array([metric([rows[i] for i in rng.integers(0, len(rows), len(rows))])
                    for _ in range(req.n_resamples)], dtype=np.float64)
    est = est[np.isfinite(est)]
    alpha = (1.0 - req.confidence) / 2.0
    lo, hi = np.quantile(est, [alpha, 1.0 - alpha]) if est.size else (math.nan, math.nan)
    return {"ci_low": float(lo), "ci_high": float(hi), "ci_std": float(est.std(ddof=1)) if est.size > 1 else None,
            "ci_confidence": req.confidence, "n_resamples": req.n_resamples,
            "ci_method": "percentile bootstrap over images", "ci_resampled": "generated"}


def flag_columns(kind: str, n_generated: int, n_reference: int | None = None, **kw: Any) -> dict[str, Any]:
    """``flags`` (JSON list) and ``flagged`` of a row; each flag is also warned (SmallSampleWarning)."""
    from imagegen.evaluate.bootstrap import warn_sample_counts

    flags = warn_sample_counts(kind, n_generated, n_reference, **kw)
    return {"flags": json.dumps(flags), "flagged": bool(flags)}


def no_flags() -> dict[str, Any]:
    return {"flags": "[]", "flagged": False}


def over_seeds(values: Sequence[float], confidence: float) -> dict[str, Any]:
    """Mean, std (ddof=1) and a Student-t interval of the mean over per-seed values."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean, std = float(v.mean()), float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, v.size - 1)) * std / math.sqrt(v.size)
    return {"value": mean, "seed_std": std, "seed_values": json.dumps(v.tolist()), "n_seeds": int(v.size),
            "ci_low": mean - half, "ci_high": mean + half, "ci_std": std / math.sqrt(v.size),
            "ci_confidence": confidence, "n_resamples": 0,
            "ci_method": f"Student t over {v.size} seeds (mean +- t*std/sqrt(n))", "ci_resampled": "seeds"}


