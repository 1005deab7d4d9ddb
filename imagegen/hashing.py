"""Content hashing: every artifact is named by a hash of its inputs, parameters and code version."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import sys
import tokenize
from pathlib import Path
from types import ModuleType
from typing import Any

from imagegen import __version__


def _canonical(obj: Any) -> Any:
    """Turn pydantic models, paths, tuples and sets into plain JSON-able values, deterministically."""
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_canonical(v) for v in obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return "NaN"
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON form of ``obj`` (dicts are order-independent)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def module_source(name: str) -> str:
    """The source text of module ``name`` as :func:`inspect.getsource` gives it, read from its file
    without importing it when no one has: an id that hashes a heavy module (torch) is computed
    without loading it."""
    module = sys.modules.get(name)
    if module is not None:
        return inspect.getsource(module)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"no Python source for module {name!r}")
    with tokenize.open(spec.origin) as f:  # the decoding linecache (and so inspect) uses
        text = f.read()
    return text if not text or text.endswith("\n") else text + "\n"  # linecache ends the last line too


def code_version(*modules: ModuleType | str) -> str:
    """Hash of the source text of the given modules plus the package version.

    Each stage names the modules its output depends on, so editing the filter code invalidates
    the filter stage and the ones after it, but not the download stage.
    """
    h = hashlib.sha256(__version__.encode())
    for mod in modules:
        src = mod if isinstance(mod, str) else inspect.getsource(mod)
        h.update(src.encode())
    return h.hexdigest()[:12]
