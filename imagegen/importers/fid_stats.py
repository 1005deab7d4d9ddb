"""Precomputed FID reference statistics (``.npz`` with ``mu``/``sigma``) as registered references.

clean-fid (``<name>_<mode>_<split>_<res>.npz``: ``mu``, ``sigma``; ``..._kid.npz``: ``feats``),
pytorch-fid / TTUR (``fid_stats_<dataset>.npz``: ``mu``, ``sigma``) and ADM/guided-diffusion
reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images, ``mu``/``sigma`` pool
statistics, ``mu_s``/``sigma_s`` spatial ones) all carry the Gaussian of 2048-d Inception pool
features.  ``import_fid_stats`` reads such a file without pickle, checks it (finite, symmetric,
matching dimensions) and stores it under ``<root>/fid_refs/<id>/`` (``stats.npz`` + ``card.json``)
where the id is the file's sha256 (first 16 hex digits): the same file is always the same
reference, whatever it is called.  An evaluation names it with ``reference_stats=NAME_OR_ID``;
its row then carries the file hash, so an FID computed here can be compared with a paper's
when the protocol (extractor, resize mode, reference split and size) matches: see the README.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from imagegen.artifacts import is_complete, read_card, stage_output, write_json_atomic
from imagegen.hashing import file_sha256

FID_REFS = "fid_refs"
NAMES = "names.json"
INCEPTION_DIM = 2048


class FidStatsError(ValueError):
    pass


def fid_refs_dir(root: Path | str) -> Path:
    return Path(root) / FID_REFS


def _names(root: Path) -> dict[str, str]:
    p = fid_refs_dir(root) / NAMES
    return json.loads(p.read_text()) if p.is_file() else {}


SPATIAL_KEYS = ("mu_s", "sigma_s")  # ADM / guided-diffusion reference batches: sFID's spatial statistics
SPATIAL_DIM = 2023  # 7 channels x 17 x 17 of Inception's mixed_6/conv


def read_npz_stats(path: str | Path, mu_key: str = "mu", sigma_key: str = "sigma") -> dict[str, Any]:
    """``{"mu", "sigma", "feats" (or None), "keys"}`` from an ``.npz``, read with ``allow_pickle=False``."""
    path = Path(path)
    if not path.is_file():
        raise FidStatsError(f"FID statistics file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise FidStatsError(f"{path} is not an .npz archive (numpy's zip of arrays); FID statistics come as "
                            f".npz files with '{mu_key}' and '{sigma_key}' arrays")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = sorted(z.files)
            feats = np.asarray(z["feats"], dtype=np.float64) if "feats" in keys else None
            if mu_key in keys and sigma_key in keys:
                mu = np.asarray(z[mu_key], dtype=np.float64)
                sigma = np.asarray(z[sigma_key], dtype=np.float64)
            elif feats is not None:  # clean-fid's _kid.npz: the features themselves
                mu, sigma = feats.mean(axis=0), np.cov(feats, rowvar=False)
            else:
                raise FidStatsError(f"{path} has arrays {keys}, not '{mu_key}' and '{sigma_key}' (nor clean-fid's "
                                    "'feats'); name the arrays with mu_key= / sigma_key=")
    except ValueError as exc:
        if isinstance(exc, FidStatsError):
            raise
        raise FidStatsError(f"{path}: cannot read its arrays without pickle ({exc}); only plain numeric arrays "
                            "are read") from None
    if mu.ndim != 1 or mu.size == 0:
        raise FidStatsError(f"{path}: '{mu_key}' must be a 1-D mean vector, has shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise FidStatsError(f"{path}: '{sigma_key}' must be a ({d}, {d}) covariance to match '{mu_key}', "
                            f"has shape {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FidStatsError(f"{path}: '{mu_key}' or '{sigma_key}' has NaN or inf entries")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-5 * scale:
        raise FidStatsError(f"{path}: '{sigma_key}' is not symmetric, so not a covariance")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != d):
        raise FidStatsError(f"{path}: 'feats' has shape {feats.shape}, expected (n, {d})")
    spatial = None
    if SPATIAL_KEYS[0] in keys or SPATIAL_KEYS[1] in keys:  # ADM's reference batches: sFID's statistics
        if not set(SPATIAL_KEYS) <= set(keys):
            raise FidStatsError(f"{path} has only one of {list(SPATIAL_KEYS)}; sFID statistics need both")
        with np.load(path, allow_pickle=False) as z:
            mu_s = np.asarray(z[SPATIAL_KEYS[0]], dtype=np.float64)
            sigma_s = np.asarray(z[SPATIAL_KEYS[1]], dtype=np.float64)
        ds = mu_s.shape[0] if mu_s.ndim == 1 else -1
        if ds < 1 or sigma_s.shape != (ds, ds) or not (np.isfinite(mu_s).all() and np.isfinite(sigma_s).all()):
            raise FidStatsError(f"{path}: '{SPATIAL_KEYS[0]}' {mu_s.shape} / '{SPATIAL_KEYS[1]}' {sigma_s.shape} are not "
                                "a finite mean vector and its square covariance")
        spatial = (mu_s, sigma_s)
    return {"mu": mu, "sigma": sigma, "feats": feats, "keys": keys, "spatial": spatial}


def import_fid_stats(root: Path | str, path: str | Path, name: str | None = None, *, protocol: str | None = None,
                     extractor: str = "inception", mode: str | None = None, mu_key: str = "mu",
                     sigma_key: str = "sigma") -> dict[str, Any]:
    """Register the statistics in ``path``; returns the reference's card.  Idempotent by file hash."""
    from imagegen.evaluate.fid import stats_hash

    root = Path(root)
    stats = read_npz_stats(path, mu_key, sigma_key)
    d = int(stats["mu"].shape[0])
    if extractor == "inception" and stats["spatial"] is not None and stats["spatial"][0].shape[0] != SPATIAL_DIM:
        raise FidStatsError(f"{path}: {stats['spatial'][0].shape[0]}-d spatial statistics (mu_s), but sFID's Inception "
                            f"spatial features are {SPATIAL_DIM}-d (7 x 17 x 17 of mixed_6/conv)")
    if extractor == "inception" and d != INCEPTION_DIM:
        raise FidStatsError(f"{path}: {d}-d statistics, but Inception pool features are {INCEPTION_DIM}-d; pass the "
                            "extractor they were computed with (extractor=...) if they are not Inception's")
    sha = file_sha256(path)
    ref_id = sha[:16]
    final = fid_refs_dir(root) / ref_id
    label = name or Path(path).stem
    if not is_complete(final):
        with stage_output(final) as (tmp, card):
            arrays = {"mu": stats["mu"], "sigma": stats["sigma"]}
            if stats["feats"] is not None:
                arrays["feats"] = stats["feats"]
            if stats["spatial"] is not None:
                arrays["mu_s"], arrays["sigma_s"] = stats["spatial"]
            np.savez(tmp / "stats.npz", **arrays)
            card.update({"id": ref_id, "name": label, "file": str(Path(path).resolve()), "file_name": Path(path).name,
                         "file_sha256": sha, "file_bytes": Path(path).stat().st_size, "arrays": stats["keys"],
                         "mu_key": mu_key, "sigma_key": sigma_key, "feature_dim": d, "extractor": extractor,
                         "mode": mode, "protocol": protocol, "has_feats": stats["feats"] is not None,
                         "n_feats": None if stats["feats"] is None else int(stats["feats"].shape[0]),
                         "stats_sha256": stats_hash(stats["mu"], stats["sigma"]),
                         "spatial_dim": None if stats["spatial"] is None else int(stats["spatial"][0].shape[0]),
                         "spatial_stats_sha256": None if stats["spatial"] is None else stats_hash(*stats["spatial"])})
    names = _names(root)
    names.pop(label, None)
    names[label] = ref_id
    fid_refs_dir(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(fid_refs_dir(root) / NAMES, names)
    return {**read_card(final), "path": str(final), "name": label}


def list_fid_refs(root: Path | str) -> list[dict[str, Any]]:
    base = fid_refs_dir(root)
    if not base.is_dir():
        return []
    names = {v: k for k, v in _names(Path(root)).items()}
    return [{**read_card(p), "path": str(p), "name": names.get(p.name, read_card(p).get("name"))}
            for p in sorted(base.iterdir()) if p.is_dir() and is_complete(p)]


def get_fid_ref(root: Path | str, name_or_id: str) -> dict[str, Any]:
    """The card of a registered reference (by name, id or unique id prefix of >= 6 characters)."""
    refs = list_fid_refs(root)
    by_name = _names(Path(root)).get(name_or_id)
    hits = [r for r in refs if r["id"] == name_or_id or r["id"] == by_name]
    if not hits and len(name_or_id) >= 6:
        hits = [r for r in refs if r["id"].startswith(name_or_id)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise FidStatsError(f"FID reference prefix {name_or_id!r} is ambiguous: {[r['id'] for r in hits]}")
    known = ", ".join(f"{r['name']} ({r['id']})" for r in refs) or "none"
    raise LookupError(f"no FID reference {name_or_id!r} under {fid_refs_dir(root)}; known: {known} "
                      "(add one with `imagegen import fid-stats FILE.npz --name NAME`)")


def load_fid_ref(root: Path | str, name_or_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(mu, sigma, feats or None, card); the stored arrays are checked against the card's hash."""
    from imagegen.evaluate.fid import stats_hash

    card = get_fid_ref(root, name_or_id)
    with np.load(Path(card["path"]) / "stats.npz", allow_pickle=False) as z:
        mu, sigma = z["mu"], z["sigma"]
        feats = z["feats"] if "feats" in z.files else None
    if stats_hash(mu, sigma) != card["stats_sha256"]:
        raise FidStatsError(f"FID reference {card['id']} at {card['path']} does not match its card's hash; "
                            "import the .npz again")
    return mu, sigma, feats, card


def remove_fid_ref(root: Path | str, name_or_id: str) -> None:
    card = get_fid_ref(root, name_or_id)
    shutil.rmtree(card["path"])
    names = {k: v for k, v in _names(Path(root)).items() if v != card["id"]}
    write_json_atomic(fid_refs_dir(root) / NAMES, names)


def load_fid_ref_spatial(root: Path | str, name_or_id: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    """(mu_s, sigma_s, card) of a reference imported with sFID statistics (ADM's ``mu_s`` / ``sigma_s``),
    checked against the card's hash; None when the file had none."""
    from imagegen.evaluate.fid import stats_hash

    card = get_fid_ref(root, name_or_id)
    if not card.get("spatial_stats_sha256"):
        return None
    with np.load(Path(card["path"]) / "stats.npz", allow_pickle=False) as z:
        mu_s, sigma_s = z["mu_s"], z["sigma_s"]
    if stats_hash(mu_s, sigma_s) != card["spatial_stats_sha256"]:
        raise FidStatsError(f"FID reference {card['id']} at {card['path']}: its spatial statistics do not match the "
                            "card's hash; import the .npz again")
    return mu_s, sigma_s, card
