"""The contract every filter of this package follows, and what they share.

A filter scores rows and decides in two separate steps, so the filter stage can score per part
(a map step: ``score`` depends only on the rows it is given) and decide globally (``decide`` sees
the whole score column, e.g. for a top-fraction rule)::

    class Filter(Protocol):
        name: str
        def score(self, data) -> np.ndarray: ...                          # float per row
        def decide(self, scores, candidates) -> np.ndarray: ...           # bool pass per row
        def extra_columns(self, data) -> dict[str, np.ndarray]: ...       # optional

``data`` is a :class:`imagegen.stages.filter.FilterInput` (or anything with ``table``,
``image_bytes`` and ``images`` over the same rows; ``clip_images(spec, batch)`` for CLIP-based
filters).  :func:`as_stage_filter` wraps such a filter for the current stage, which calls
``f(data, candidates) -> (score, passes)``.

Model-backed filters load their model once per process through :func:`cached_model` (keyed by
everything that shapes the model) and run it over the given rows in batches.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from imagegen.hashing import file_sha256  # noqa: F401  (re-exported for the filter modules)


class FilterModelError(ValueError):
    """A filter's model or list cannot be used; the message says which file and why."""


@runtime_checkable
class ScoringFilter(Protocol):
    name: str

    def score(self, data: Any) -> np.ndarray:
        """One float per row of ``data``; depends only on those rows."""

    def decide(self, scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Bool pass per row over the whole score column (``candidates``: rows still in play)."""


# ---------------------------------------------------------------------------- the stage adapter

@dataclass
class StageAdapter:
    """Today's stage protocol ``f(data, candidates) -> (score, passes)`` over a scoring filter."""

    inner: ScoringFilter

    @property
    def name(self) -> str:
        return self.inner.name

    def __call__(self, data: Any, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.asarray(self.inner.score(data), dtype=np.float64)
        if s.shape != (len(data.image_bytes),):
            raise AssertionError(f"filter {self.name}: score has shape {s.shape} for {len(data.image_bytes)} rows")
        return s, np.asarray(self.inner.decide(s, np.asarray(candidates, bool)), dtype=bool)

    def score(self, data: Any) -> np.ndarray:
        return self.inner.score(data)

    def decide(self, scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return self.inner.decide(scores, candidates)

    def extra_columns(self, data: Any) -> dict[str, np.ndarray]:
        fn = getattr(self.inner, "extra_columns", None)
        return fn(data) if fn is not None else {}

    def identity(self) -> dict[str, Any]:
        fn = getattr(self.inner, "identity", None)
        return fn() if fn is not None else {}


def as_stage_filter(f: ScoringFilter) -> StageAdapter:
    return StageAdapter(f)


# ---------------------------------------------------------------------------- decisions

def pass_below(scores: np.ndarray, maximum: float, inclusive: bool = False) -> np.ndarray:
    """Pass rows whose score is under ``maximum`` (NaN never passes)."""
    s = np.asarray(scores, dtype=np.float64)
    return (s <= maximum) if inclusive else (s < maximum)


def pass_at_least(scores: np.ndarray, minimum: float) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64) >= minimum


# ---------------------------------------------------------------------------- per-process caches

_MODEL_CACHE: dict[tuple[Any, ...], Any] = {}
_MODEL_LOCK = threading.Lock()


def cached_model(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``build()`` once per process for ``key`` (a tuple of everything that shapes the model)."""
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = build()
        return _MODEL_CACHE[key]


def clear_model_cache() -> None:
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()


def model_cache_keys() -> list[tuple[Any, ...]]:
    with _MODEL_LOCK:
        return list(_MODEL_CACHE)


class RowResults:
    """Per-row side results of the last ``score`` call on a given input object, so
    ``extra_columns(data)`` right after ``score(data)`` does not run the model again."""

    def __init__(self) -> None:
        self._ref: weakref.ReferenceType[Any] | None = None
        self._rows: list[Any] | None = None

    def put(self, data: Any, rows: list[Any]) -> None:
        try:
            self._ref = weakref.ref(data)
        except TypeError:  # not weak-referenceable: do not cache
            self._ref = None
        self._rows = rows

    def get(self, data: Any) -> list[Any] | None:
        if self._ref is not None and self._ref() is data:
            return self._rows
        return None


# ---------------------------------------------------------------------------- helpers

def batches(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def require_file(path: str | Path, what: str, suffixes: tuple[str, ...] | None = None) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FilterModelError(f"{what}: file {p} does not exist")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        hint = (" (convert a .pth/.pt checkpoint with `python -m imagegen.filters convert-aesthetic` or "
                "`convert-watermark`: tensors are read with torch.load(weights_only=True))"
                if ".safetensors" in suffixes else "")
        raise FilterModelError(f"{what}: {p} is not a {'/'.join(suffixes)} file{hint}")
    return p


def load_safetensors(path: str | Path, what: str) -> dict[str, Any]:
    """Tensors of a safetensors file (CPU), with a clear error for a missing or damaged file."""
    from safetensors.torch import load_file

    p = require_file(path, what, (".safetensors",))
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise FilterModelError(f"{what}: {p} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def read_pickled_tensors(path: str | Path, what: str) -> dict[str, Any]:
    """A published ``.pth``/``.pt`` state dict, read with ``torch.load(weights_only=True)`` (tensors
    and plain containers only; nothing else in the pickle is executed).  A ``{"state_dict": ...}``
    wrapper is unwrapped."""
    import torch

    p = require_file(path, what)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FilterModelError(f"{what}: {p} could not be read as tensors with torch.load(weights_only=True) "
                               f"({type(exc).__name__}: {exc}); a whole pickled model is refused on purpose: "
                               "save its state_dict() on a machine you trust") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FilterModelError(f"{what}: {p} does not hold a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def save_tensors(tensors: dict[str, Any], out: str | Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    return out


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def load_state_strict(module: Any, state: dict[str, Any], what: str, path: str | Path) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise FilterModelError(f"{what}: weights {path} do not fit the configured architecture: "
                               + "; ".join(parts))
    module.load_state_dict(state, strict=True)
