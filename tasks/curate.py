"""Prefect tasks for the curate DAG: thin wrappers around :mod:`imagegen.curate`.

Tasks receive and return ids and paths (``StageResult`` as a dict), never images or frames.
Their cache key is the stage's content id (upstream ids + parameters + code version), not the
flow run, so a rerun with the same inputs is served from cache and reuses the artifacts on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from imagegen import curate as C
from imagegen.hashing import code_version, stable_hash


def _ident(value: Any) -> Any:
    if isinstance(value, dict) and {"stage", "id", "path"} <= value.keys():
        return {"stage": value["stage"], "id": value["id"]}  # counts/cached flags are not identity
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value) if isinstance(value, Path) else value


_CODE = code_version(C)  # the stage functions' code; each stage's own modules are hashed inside its id


def content_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key = task name + upstream stage ids + parameters + code version of the stage."""
    ident = {k: _ident(v) for k, v in sorted(parameters.items())}
    return f"imagegen-{context.task.name}-" + stable_hash({"p": ident, "code": _CODE})


def _res(d: dict[str, Any] | None) -> C.StageResult | None:
    return None if d is None else C.StageResult.model_validate(d)


_opts = dict(cache_key_fn=content_key, persist_result=True, result_serializer="json")


@task(name="publish-world", **_opts)
def publish_world(root: str, source: C.SourceConfig) -> dict[str, Any]:
    return C.world_stage(Path(root), source).model_dump()


@task(name="reference-clip", timeout_seconds=3600, **_opts)
def reference_clip(root: str, source: C.SourceConfig, cfg: C.ReferenceClipConfig) -> dict[str, Any]:
    return C.reference_clip_stage(Path(root), source, cfg).model_dump()


@task(name="download", retries=1, retry_delay_seconds=5, **_opts)
def download(root: str, source: C.SourceConfig, world: dict | None, cfg: C.DownloadConfig) -> dict[str, Any]:
    return C.download_stage(Path(root), source, _res(world), cfg).model_dump()


@task(name="dedup", **_opts)
def dedup(root: str, dl: dict, cfg: C.DedupConfig, clip: dict | None = None) -> dict[str, Any]:
    return C.dedup_stage(Path(root), _res(dl), cfg, _res(clip)).model_dump()


@task(name="filter", **_opts)
def filter_images(root: str, dl: dict, dd: dict, cfg: C.FilterConfig, clip: dict | None) -> dict[str, Any]:
    return C.filter_stage(Path(root), _res(dl), _res(dd), cfg, _res(clip)).model_dump()


@task(name="recaption", **_opts)
def recaption(root: str, dl: dict, ff: dict, cfg: C.RecaptionConfig, clip: dict | None) -> dict[str, Any]:
    return C.recaption_stage(Path(root), _res(dl), _res(ff), cfg, _res(clip)).model_dump()


@task(name="shard", **_opts)
def shard(root: str, name: str, config: C.CurateConfig, dl: dict, dd: dict, ff: dict, rc: dict,
          world: dict | None, clip: dict | None) -> dict[str, Any]:
    return C.shard_stage(Path(root), name, config, _res(dl), _res(dd), _res(ff), _res(rc), _res(world),
                         _res(clip)).model_dump()
