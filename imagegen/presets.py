"""Named parameter sets and dotted overrides, shared by the CLI, the flows and prefect.yaml.

A preset is a partial dict merged over the config's defaults; overrides like
``download.timeout=3`` or ``source.publish.n_images=500`` are merged last; the result is
validated by pydantic, so a bad value is refused before any work starts.
"""

from __future__ import annotations

import copy
import json
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

# The world guarantees distinct scenes are > 10 phash bits apart and planted near duplicates
# <= 4 bits from their source as served; download's resize/re-encode can move a near duplicate
# a few bits further (8 measured), so the world presets search radius 8, still below 10.
WORLD_DEDUP = {"radius": 8}

CURATE_PRESETS: dict[str, dict[str, Any]] = {
    # a few hundred images in about two minutes on 2 cores (reference CLIP training included)
    "smoke": {
        "name": "world-smoke",
        "source": {"publish": {"n_images": 300, "stall_seconds": 4.0}},
        # = ReferenceClipConfig.smoke(): ~40 s on 2 cores, 0.68 top-1 over 252 distinct captions
        "reference_clip": {"n_train": 2000, "n_heldout": 300, "steps": 300, "warmup_steps": 30},
        "download": {"timeout": 2.0, "processes_count": 2, "thread_count": 16},
        "dedup": WORLD_DEDUP,
        "shard": {"target_shard_size": 64},
    },
    # a few thousand images
    "demo": {
        "name": "world-demo",
        "source": {"publish": {"n_images": 3000, "stall_seconds": 4.0}},
        "download": {"timeout": 2.0, "processes_count": 2, "thread_count": 32},
        "dedup": WORLD_DEDUP,
        "shard": {"target_shard_size": 500},
    },
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=VALUE`` -> {"a": {"b": {"c": VALUE}}}; VALUE is JSON when it parses, else a string."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    path, raw = text.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict[str, Any] = {}
    cur = out
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return out


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Several ``a.b=value`` overrides merged into one nested dict (later ones win)."""
    out: dict[str, Any] = {}
    for text in overrides or []:
        out = deep_merge(out, parse_override(text))
    return out


def base_data(model: type[M], presets: dict[str, dict[str, Any]], preset: str | None, request: M | None,
              what: str = "preset") -> dict[str, Any]:
    """The dict an override merge starts from: ``request`` (checked to be a ``model``) as JSON,
    else a deep copy of the named preset, else {}; an unknown preset name is refused."""
    if request is not None:
        if not isinstance(request, model):
            article = "an" if model.__name__[0] in "AEIOU" else "a"
            raise TypeError(f"request must be {article} {model.__name__}, got {type(request).__name__}")
        return request.model_dump(mode="json")
    if preset is None:
        return {}
    if preset not in presets:
        raise ValueError(f"unknown {what} {preset!r}; choose one of {sorted(presets)}")
    return copy.deepcopy(presets[preset])


def build_config(model: type[M], presets: dict[str, dict[str, Any]], preset: str | None,
                 overrides: list[str] | dict[str, Any] | None = None) -> M:
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    data = copy.deepcopy(presets.get(preset, {})) if preset else {}
    data = deep_merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return model.model_validate(data)
