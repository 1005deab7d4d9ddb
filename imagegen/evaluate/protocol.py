"""Protocol cards: what must be equal for two evaluations (or two leaderboards) to be compared.

An evaluation's card (:func:`eval_protocol`, from its metric rows) holds, per result name, the
extractor and a hash of its weights identity, the resize / preprocessing mode, the reference
statistics hash, and, for the whole evaluation, the sample count, the seeds, the interval settings
and the reference (dataset or imported statistics).  A leaderboard carries one card
(:func:`leaderboard_protocol`): the fields all its evaluations share, and ``mixed`` naming the
ones they do not.  :func:`comparability` says why two cards are not comparable (empty: they are).
Light on purpose (no torch): the leaderboard imports it.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from imagegen.hashing import stable_hash

ROW_FIELDS = ("extractor", "extractor_weights", "mode", "preprocessing", "reference_stats_sha256", "clip",
              "model", "detector", "detector_identity", "vqa_model", "prompts", "prompt_set", "k", "estimator",
              "kid_subset_size", "splits")
EVAL_FIELDS = ("n_samples", "seeds", "reference", "n_resamples", "confidence", "guidance")


def _plain(v: Any) -> Any:
    if isinstance(v, float) and v != v:  # NaN from a parquet column another metric filled
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


def eval_protocol(rows: Iterable[Mapping[str, Any]], req: Mapping[str, Any], seeds: list[int],
                  n_samples: int) -> dict[str, Any]:
    """The protocol card of one evaluation (``req``: the request as a dict)."""
    metrics: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = {}
        for f in ROW_FIELDS:
            v = _plain(r.get(f))
            if v is None:
                continue
            if f in ("extractor_weights", "clip", "model", "detector_identity", "vqa_model"):
                f, v = f + "_sha256", stable_hash(v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True))
            entry[f] = v
        metrics[str(r["metric"])] = entry
    reference = req.get("reference_stats") and f"stats:{req['reference_stats']}" or req.get("reference") or "run dataset"
    return {"metrics": metrics, "n_samples": int(n_samples), "seeds": [int(s) for s in seeds],
            "reference": reference, "n_resamples": req.get("n_resamples"), "confidence": req.get("confidence"),
            "guidance": req.get("guidance"), "fid_mode": req.get("fid_mode")}


def leaderboard_protocol(cards: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One card for a leaderboard: per metric the fields every evaluation shares; ``mixed`` lists
    what differs between its evaluations (its rows are then not comparable on those metrics)."""
    cards = [c for c in cards if c]
    out: dict[str, Any] = {"metrics": {}, "mixed": [], "evaluations": len(cards)}
    if not cards:
        return out
    for f in (*EVAL_FIELDS, "fid_mode"):
        vals = {json.dumps(c.get(f), sort_keys=True, default=str) for c in cards}
        if f == "seeds":  # rows of one leaderboard may use different seeds; the count must agree
            vals = {str(len(c.get("seeds") or [])) for c in cards}
            out["n_seeds"] = int(next(iter(vals))) if len(vals) == 1 else None
            if len(vals) > 1:
                out["mixed"].append(f"n_seeds: {sorted(vals)}")
            out["seeds"] = sorted({s for c in cards for s in (c.get("seeds") or [])})
            continue
        if len(vals) == 1:
            out[f] = json.loads(next(iter(vals)))
        else:
            out[f] = None
            out["mixed"].append(f"{f}: {sorted(vals)}")
    names = sorted({m for c in cards for m in c.get("metrics", {})})
    for m in names:
        entries = [c["metrics"][m] for c in cards if m in c.get("metrics", {})]
        shared = {}
        for f in sorted({k for e in entries for k in e}):
            vals = {json.dumps(e.get(f), sort_keys=True, default=str) for e in entries}
            if len(vals) == 1:
                shared[f] = json.loads(next(iter(vals)))
            else:
                out["mixed"].append(f"{m} {f}: {len(vals)} different values")
        out["metrics"][m] = shared
    out["id"] = stable_hash({k: v for k, v in out.items() if k not in ("evaluations", "seeds")})
    return out


def comparability(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Why leaderboard (or evaluation) cards ``a`` and ``b`` cannot be compared; empty = comparable.

    Each card must be consistent itself (nothing ``mixed``); then every shared metric must have the
    same extractor, weights, preprocessing and reference statistics, and the sample count, the
    number of seeds, the reference and the interval settings must agree."""
    why = [f"card {name} mixes protocols: {'; '.join(c['mixed'])}" for name, c in (("A", a), ("B", b))
           if c.get("mixed")]
    for f in ("n_samples", "n_seeds", "reference", "n_resamples", "confidence", "guidance", "fid_mode"):
        va, vb = a.get(f), b.get(f)
        if f == "n_seeds":
            va = va if va is not None else len(a.get("seeds") or [])
            vb = vb if vb is not None else len(b.get("seeds") or [])
        if va != vb:
            why.append(f"{f} differs: {va!r} vs {vb!r}")
    ma, mb = a.get("metrics", {}), b.get("metrics", {})
    common = sorted(set(ma) & set(mb))
    if not common:
        why.append(f"no metric in common (A: {sorted(ma)}, B: {sorted(mb)})")
    for m in common:
        for f in sorted(set(ma[m]) | set(mb[m])):
            if ma[m].get(f) != mb[m].get(f):
                why.append(f"{m}: {f} differs ({ma[m].get(f)!r} vs {mb[m].get(f)!r})")
    return why
