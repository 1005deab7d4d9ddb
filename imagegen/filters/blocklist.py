"""Hash blocklist: drop images whose hash is on a user-supplied list of known-bad hashes.

This is how CSAM / PhotoDNA-style lists are applied to a crawl: the list holds hashes, never
images.  A list is a text file, one entry per line, ``KIND:HEX`` (``#`` starts a comment)::

    # known-bad images, source: ...
    phash:8f373714acfcf4d0
    sha256:3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

Perceptual kinds (``phash``, ``dhash``, ``ahash``, ``whash``: the 64-bit imagehash functions of
the dedup stage, same bit order as its ``phash`` column) match within a Hamming ``radius``, found
exactly with the multi-index-hashing search of :mod:`imagegen.mih` over the list and the rows
together.  ``sha256`` matches exactly, against the stored image bytes and, when the table has it,
the ``source_sha256`` of the bytes as downloaded.  The score of a row is the Hamming distance to
the nearest listed hash within the radius (0 for an exact match), NaN when none is that close;
the matched entry is kept in ``hash_blocklist_match``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from imagegen import mih
from imagegen.filters.base import FilterModelError, RowResults, file_sha256

PERCEPTUAL_KINDS = ("phash", "dhash", "ahash", "whash")
KINDS = (*PERCEPTUAL_KINDS, "sha256")
_HEX = {"sha256": re.compile(r"^[0-9a-f]{64}$"), **{k: re.compile(r"^[0-9a-f]{16}$") for k in PERCEPTUAL_KINDS}}


class HashBlocklistConfig(BaseModel):
    """Known-bad hashes: reject rows whose perceptual hash is within ``radius`` of a listed one, or
    whose sha256 is listed."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Text file of 'KIND:HEX' lines (KIND: phash, dhash, ahash, whash, sha256)")
    radius: int = Field(4, ge=0, le=mih.MAX_RADIUS, description="Max Hamming distance (of 64 bits) for a "
                        "perceptual match")


@dataclass(frozen=True)
class Blocklist:
    perceptual: dict[str, np.ndarray]  # kind -> sorted unique uint64
    sha256: frozenset[str]
    source: str

    def __len__(self) -> int:
        return sum(len(v) for v in self.perceptual.values()) + len(self.sha256)


def read_blocklist(path: str | Path) -> Blocklist:
    """Parse and validate a blocklist file; errors name the line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FilterModelError(f"hash blocklist {p} does not exist")
    per: dict[str, set[int]] = {}
    sha: set[str] = set()
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, sep, value = line.partition(":")
        kind, value = kind.strip().lower(), value.strip().lower()
        if not sep or kind not in KINDS:
            raise FilterModelError(f"hash blocklist {p}, line {n}: {raw.strip()!r} is not 'KIND:HEX' with KIND "
                                   f"one of {list(KINDS)}")
        if not _HEX[kind].match(value):
            want = 64 if kind == "sha256" else 16
            raise FilterModelError(f"hash blocklist {p}, line {n}: {kind} needs {want} hex digits, got {value!r}")
        if kind == "sha256":
            sha.add(value)
        else:
            per.setdefault(kind, set()).add(int(value, 16))
    return Blocklist({k: np.array(sorted(v), dtype=np.uint64) for k, v in per.items()}, frozenset(sha), str(p))


def nearest_listed(rows: np.ndarray, listed: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row hash: (Hamming distance to the nearest listed hash within ``radius`` or -1,
    index into ``listed`` of that hash or -1); exact, through :func:`imagegen.mih.near_pairs`."""
    rows = np.asarray(rows, dtype=np.uint64)
    listed = np.asarray(listed, dtype=np.uint64)
    n_l = len(listed)
    dist = np.full(len(rows), -1, dtype=np.int64)
    which = np.full(len(rows), -1, dtype=np.int64)
    if n_l == 0 or len(rows) == 0:
        return dist, which
    res = mih.near_pairs(np.concatenate([listed, rows]), radius)
    inv_l, inv_r = res.inverse[:n_l], res.inverse[n_l:]
    n_u = len(res.unique)
    best_d = np.full(n_u, 65, dtype=np.int64)  # per unique value: distance to the nearest listed value
    best_i = np.full(n_u, -1, dtype=np.int64)
    listed_of_unique = np.full(n_u, -1, dtype=np.int64)
    listed_of_unique[inv_l] = np.arange(n_l)
    is_listed = listed_of_unique >= 0
    best_d[is_listed] = 0
    best_i[is_listed] = listed_of_unique[is_listed]
    if len(res.pairs):
        a, b, d = res.pairs[:, 0], res.pairs[:, 1], res.distances.astype(np.int64)
        # candidates (unlisted value x, distance, listed entry) from both orientations of each pair
        x = np.concatenate([a, b])
        y = np.concatenate([b, a])
        dd = np.concatenate([d, d])
        keep = is_listed[y] & ~is_listed[x]
        x, li, dd = x[keep], listed_of_unique[y[keep]], dd[keep]
        order = np.lexsort((li, dd, x))  # per x: the smallest distance, then the first listed entry
        x, li, dd = x[order], li[order], dd[order]
        first = np.ones(len(x), bool)
        first[1:] = x[1:] != x[:-1]
        best_d[x[first]] = dd[first]
        best_i[x[first]] = li[first]
    hit = best_d[inv_r] <= radius
    dist[hit] = best_d[inv_r][hit]
    which[hit] = best_i[inv_r][hit]
    return dist, which


@dataclass
class HashBlocklistFilter:
    cfg: HashBlocklistConfig
    name: str = "hash_blocklist"
    _rows: RowResults = field(default_factory=RowResults, repr=False)

    @property
    def blocklist(self) -> Blocklist:
        return read_blocklist(self.cfg.path)

    def match(self, data: Any) -> tuple[np.ndarray, list[str]]:
        """(distance per row, NaN when unmatched; the matched 'KIND:HEX' entry or '')."""
        from imagegen.stages.dedup import HASH_SIZE, compute_hashes

        bl = self.blocklist
        n = len(data.image_bytes)
        dist = np.full(n, np.nan)
        entry = [""] * n
        if bl.sha256:
            digests = [hashlib.sha256(b).hexdigest() for b in data.image_bytes]
            table = getattr(data, "table", None)
            source = (table["source_sha256"].astype(str).tolist()
                      if table is not None and "source_sha256" in table else [""] * n)
            for i, (d, s) in enumerate(zip(digests, source)):
                hit = d if d in bl.sha256 else (s if s in bl.sha256 else None)
                if hit is not None:
                    dist[i], entry[i] = 0.0, f"sha256:{hit}"
        for kind, listed in bl.perceptual.items():
            hashes = compute_hashes(data.image_bytes, kind, HASH_SIZE)
            d, w = nearest_listed(hashes, listed, self.cfg.radius)
            for i in np.flatnonzero(d >= 0):
                if np.isnan(dist[i]) or d[i] < dist[i]:
                    dist[i], entry[i] = float(d[i]), f"{kind}:{int(listed[w[i]]):016x}"
        self._rows.put(data, entry)
        return dist, entry

    def score(self, data: Any) -> np.ndarray:
        return self.match(data)[0]

    def decide(self, scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return np.isnan(np.asarray(scores, dtype=np.float64))

    def extra_columns(self, data: Any) -> dict[str, np.ndarray]:
        entry = self._rows.get(data)
        if entry is None:
            entry = self.match(data)[1]
        return {f"{self.name}_match": np.array(entry, dtype=object)}

    def identity(self) -> dict[str, Any]:
        return {"blocklist_sha256": file_sha256(self.cfg.path)}
