"""The curate DAG as plain functions: world -> reference CLIP -> download -> dedup -> filter ->
recaption -> shard (the dataset).

Each stage function takes the results of the stages before it (ids and paths, never data),
names its output folder by a hash of (inputs' ids, its own parameters, its code version), and
returns at once when that folder is already complete.  Prefect tasks in ``tasks/curate.py`` are
thin wrappers around these functions; tests call them directly.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import imagegen.stages.dedup as dedup_mod
import imagegen.stages.download as download_mod
import imagegen.stages.filter as filter_mod
import imagegen.stages.recaption as recaption_mod
import imagegen.stages.ledger as ledger_mod
import imagegen.stages.shard_parts as shard_parts
from imagegen.artifacts import is_complete, read_card, stage_output
from imagegen.executors import check_distributor, check_runner, runner_spec, shared_executors
from imagegen.hashing import code_version, file_sha256, stable_hash
from imagegen.paths import datasets_dir, ensure_writable, models_dir, stage_dir
from imagegen.registry import DatasetRef, get_dataset, register_name
from imagegen.stages.dedup import DedupConfig
from imagegen.stages.download import DownloadConfig
from imagegen.stages.filter import FilterConfig
from imagegen.stages.ledger import read_ledger
from imagegen.stages.recaption import RecaptionConfig
from imagegen.stages.shard import ShardConfig
from imagegen.world.publish import PublishConfig
from imagegen.world.reference_clip_config import ReferenceClipConfig
from imagegen.world.scene import WorldConfig

log = logging.getLogger(__name__)

# The modules each stage's output depends on: their source is the stage's code version (in this
# order; user filters' and captioners' own modules are added by stage_code).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "world": ("imagegen.world.scene", "imagegen.world.publish"),
    "download": ("imagegen.stages.download", "imagegen.stages.ledger"),
    "dedup": ("imagegen.stages.dedup", "imagegen.mih"),
    "filter": ("imagegen.stages.filter",),
    "recaption": ("imagegen.stages.recaption", "imagegen.world.detector"),
    "shard": ("imagegen.stages.shard", "imagegen.stages.shard_parts"),
}


def user_modules(stage: str, cfg: BaseModel) -> list[str]:
    """Modules outside STAGE_MODULES that a stage's config brings in: the custom filters'
    (``FilterConfig.custom``) and the captioner's (``RecaptionConfig.backend``), so editing one
    recomputes the stage."""
    names: list[str] = []
    if stage == "filter":
        for spec in getattr(cfg, "custom", ()):
            factory = filter_mod._REGISTRY.get(spec)
            names.append(factory.__module__ if factory is not None else spec.partition(":")[0])
    elif stage == "recaption":
        factory = recaption_mod.CAPTIONERS.get(getattr(cfg, "backend", ""))
        if factory is not None:
            names.append(factory.__module__)
    return names


def stage_code(stage: str, cfg: BaseModel | None = None) -> str:
    """The code version of ``stage``: STAGE_MODULES plus its config's user modules, each once."""
    import importlib

    names = list(dict.fromkeys([*STAGE_MODULES[stage], *(user_modules(stage, cfg) if cfg is not None else [])]))
    return code_version(*(importlib.import_module(n) for n in names))


# Fields that change how fast a stage runs, never what it produces: left out of stage ids.
EXECUTION_FIELDS = {
    "download": {"processes_count", "thread_count", "distributor", "distributor_address", "runner"},
    "dedup": {"processes", "batch_rows", "runner", "semantic_batch_size"},
    "filter": {"runner"},
    "recaption": {"batch_size", "device"},
}
RUNNER_STAGES = ("download", "dedup", "filter")  # stages with per-part map steps on the runner


class SourceConfig(BaseModel):
    """Where the URLs come from: the embedded world (served on loopback) or a user's URL list."""
    model_config = ConfigDict(extra="forbid")

    kind: Literal["world", "url_list"] = "world"
    url_list: str | None = Field(None, description="Parquet/CSV/TSV/JSONL of url + caption (kind=url_list)")
    world: WorldConfig = Field(default_factory=WorldConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    world_host: str = Field("127.0.0.1", description="Where the world's HTTP server listens (loopback)")
    world_port: int = Field(0, ge=0, le=65535, description="0 picks a free port")

    @model_validator(mode="after")
    def _needs_list(self) -> "SourceConfig":
        if self.kind == "url_list" and not self.url_list:
            raise ValueError("source.kind='url_list' needs source.url_list (a parquet or CSV of url, caption)")
        return self


class CurateConfig(BaseModel):
    """Every parameter of the curate flow.  Prefect renders this as the run form."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field("world", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$",
                      description="Registry name of the resulting dataset")
    source: SourceConfig = Field(default_factory=SourceConfig)
    reference_clip: ReferenceClipConfig = Field(default_factory=ReferenceClipConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    recaption: RecaptionConfig = Field(default_factory=RecaptionConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    parent: str | None = Field(None, description="Make a new version of this registered dataset (NAME, NAME@N "
                               "or id): reuse its parts, fetch again only the rows that failed for a transient "
                               "reason, plus download.append_list; registered as NAME@<next>")
    runner: str = Field("local", description="Where the per-part map steps run: local (a process pool sized "
                        "to the machine), local:N, dask (a LocalCluster), dask:N, dask://HOST:PORT, ray, ray:N, "
                        "ray://HOST:PORT; a stage's own runner field overrides it. Never part of an id")

    @field_validator("runner")
    @classmethod
    def _runner_spec(cls, v: str) -> str:
        return runner_spec(v)

    @model_validator(mode="after")
    def _parent(self) -> "CurateConfig":
        if self.parent and not self.download.parent:
            object.__setattr__(self, "download", self.download.model_copy(update={"parent": self.parent}))
        if self.download.append_list and not self.download.parent:
            raise ValueError("download.append_list needs a parent dataset (parent=NAME) to append to")
        return self

    @model_validator(mode="after")
    def _stage_runners(self) -> "CurateConfig":
        for stage in RUNNER_STAGES:
            sub = getattr(self, stage)
            if sub.runner is None:
                object.__setattr__(self, stage, sub.model_copy(update={"runner": self.runner}))
        return self


class StageResult(BaseModel):
    """What flows between stages: an id and a path, plus the stage card's counts."""
    stage: str
    id: str
    path: str
    cached: bool = False
    counts: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, stage: str, id: str, path: str, cached: bool = False,
                 counts: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(stage=stage, id=id, path=path, cached=cached, counts=counts or {}, **kw)


def _params(stage: str, cfg: BaseModel) -> dict[str, Any]:
    d = cfg.model_dump(mode="json")
    fields = EXECUTION_FIELDS.get(stage, ())
    if stage == "recaption" and d.get("backend") != "world_detector":
        fields = ()  # a model's output depends on its device and batch (padding, kernels): hashed
    for k in fields:
        d.pop(k, None)
    return d


def stage_id(stage: str, inputs: dict[str, Any], params: dict[str, Any], code: str) -> str:
    """A stage's content id: its inputs' ids, its parameters, its code version."""
    return stable_hash({"stage": stage, "inputs": inputs, "params": params, "code": code})


def _run_stage(root: Path, stage: str, inputs: dict[str, Any], params: dict[str, Any], code: str,
               body: Callable[[Path, dict[str, Any]], dict[str, Any]],
               final: Callable[[str], Path] | None = None) -> StageResult:
    """Content-addressed, atomic, idempotent execution of one stage."""
    sid = stage_id(stage, inputs, params, code)
    out = final(sid) if final is not None else stage_dir(root, stage, sid)
    if is_complete(out):
        return StageResult(stage, sid, str(out), cached=True, counts=read_card(out).get("counts", {}))
    t0 = time.perf_counter()
    with stage_output(out) as (tmp, card):
        counts = body(tmp, card)
        card.update({"stage": stage, "id": sid, "inputs": inputs, "params": params, "code_version": code,
                     "counts": counts, "seconds": round(time.perf_counter() - t0, 3)})
    log.info("%s %s done in %.1fs: %s", stage, sid, time.perf_counter() - t0, counts)
    return StageResult(stage, sid, str(out), cached=False, counts=counts)


# ---------------------------------------------------------------------------- stages

def world_stage(root: Path, source: SourceConfig) -> StageResult:
    """Publish the embedded world (files, routes, URL paths, ground truth) once per config."""
    from imagegen.world import publish as publish_mod

    def body(tmp: Path, card: dict[str, Any]) -> dict[str, Any]:
        return publish_mod.publish_world(source.world, source.publish, tmp)

    return _run_stage(root, "world", {}, {"world": source.world.model_dump(mode="json"),
                                          "publish": source.publish.model_dump(mode="json")},
                      stage_code("world"), body)


def reference_clip_stage(root: Path, source: SourceConfig, cfg: ReferenceClipConfig) -> StageResult:
    from imagegen.world.reference_clip_config import reference_clip_id

    path = models_dir(root) / "reference_clip" / reference_clip_id(source.world, cfg)
    existed = is_complete(path)
    if not existed:
        from imagegen.world import reference_clip as rc  # torch and open_clip: only to train it

        path = rc.ensure_reference_clip(source.world, cfg, models_dir(root))
    card = read_card(path)
    return StageResult("reference_clip", path.name, str(path), cached=existed,
                       counts={"retrieval": card.get("retrieval"), "seconds": card.get("seconds"),
                               "n_params": card.get("n_params")})


def source_id(source: SourceConfig, world: StageResult | None) -> str:
    if source.kind == "world":
        assert world is not None
        return f"world-{world.id}"
    return f"file-{file_sha256(source.url_list)[:16]}"


def parent_download(root: Path, parent: str) -> tuple[DatasetRef, Path]:
    """The parent dataset of an incremental version and its download stage folder."""
    ref = get_dataset(root, parent)
    dl_id = ref.card.get("stage_ids", {}).get("download")
    path = stage_dir(root, "download", dl_id) if dl_id else None
    if path is None or not is_complete(path):
        raise FileNotFoundError(f"parent dataset {parent!r} ({ref.id}): its download stage {dl_id} is not in "
                                f"{stage_dir(root, 'download', '')}; an incremental version needs it")
    return ref, path


def download_stage(root: Path, source: SourceConfig, world: StageResult | None, cfg: DownloadConfig) -> StageResult:
    """Fetch every URL with img2dataset; for the world, serve it on loopback for the duration.

    With ``cfg.parent`` (a dataset id, see :func:`resolve_parent`): a new version that reuses the
    parent's parts (:mod:`imagegen.stages.incremental`)."""
    sid_inputs: dict[str, Any] = {"source": source_id(source, world)}
    params = _params("download", cfg)
    for k in ("parent", "append_list"):
        params.pop(k, None)
    parent_dir = None
    if cfg.parent:
        pref, parent_dir = parent_download(root, cfg.parent)
        sid_inputs["parent_download"] = parent_dir.name
        if cfg.append_list:
            sid_inputs["append"] = f"file-{file_sha256(cfg.append_list)[:16]}"

    def body(tmp: Path, card: dict[str, Any]) -> dict[str, Any]:
        if parent_dir is not None:
            return incremental_body(tmp, card)
        if source.kind == "url_list":  # read only when the stage runs (check_preconditions validated it)
            # streamed: run_download reads and checks the list in batches (never the whole table)
            return download_mod.run_download(Path(source.url_list), cfg, tmp, runner=cfg.runner)
        from imagegen.world.publish import url_table
        from imagegen.world.server import serve_world

        with serve_world(Path(world.path), host=source.world_host, port=source.world_port) as srv:
            base = srv.base_url if hasattr(srv, "base_url") else str(srv)
            urls = url_table(Path(world.path), base)
            urls["skip_reason"] = None
            counts = download_mod.run_download(urls, cfg, tmp, runner=cfg.runner)
            if hasattr(srv, "stats"):
                card["server_requests"] = srv.stats()
        return counts

    def incremental_body(tmp: Path, card: dict[str, Any]) -> dict[str, Any]:
        from imagegen.stages import incremental

        append = None
        if cfg.append_list:  # streamed: checked, then read in batches by the incremental download
            append = Path(cfg.append_list)
        card["parent"] = {"dataset": cfg.parent, "download": parent_dir.name}
        if source.kind == "url_list":
            urls = read_ledger(parent_dir, ["row_id", "url", "caption"])
            return incremental.run_incremental_download(parent_dir, urls, append, cfg, tmp, runner=cfg.runner)
        from imagegen.world.publish import url_table
        from imagegen.world.server import serve_world

        with serve_world(Path(world.path), host=source.world_host, port=source.world_port) as srv:
            urls = url_table(Path(world.path), srv.base_url)  # the parent's URLs named another port
            return incremental.run_incremental_download(parent_dir, urls, append, cfg, tmp, runner=cfg.runner)

    from imagegen.stages import incremental as incremental_mod
    code = stage_code("download") if parent_dir is None else stable_hash(
        {"download": stage_code("download"), "incremental": code_version(incremental_mod)})
    return _run_stage(root, "download", sid_inputs, params, code, body)


def resolve_parent(config: "CurateConfig", root: Path) -> "CurateConfig":
    """``parent`` (NAME, NAME@N or id) -> the parent dataset's id, so the ids (and Prefect's cache
    keys) name an immutable parent, whatever the registry's names point at later."""
    spec = config.download.parent
    if not spec:
        return config
    ref = get_dataset(root, spec)
    if ref.id == spec:
        return config
    return config.model_copy(update={"download": config.download.model_copy(update={"parent": ref.id})})


def dedup_stage(root: Path, download: StageResult, cfg: DedupConfig, clip: StageResult | None = None) -> StageResult:
    """Exact and perceptual duplicates; with ``cfg.semantic``, SemDeDup over CLIP embeddings too
    (``clip``: the world's reference CLIP, for ``semantic_model='world'``)."""
    def body(tmp: Path, card: dict[str, Any]) -> dict[str, Any]:
        d = Path(download.path)
        # the download folder's per-part ledger, read lazily (its errors name that folder, not a copy)
        counts = dedup_mod.run_dedup(d / "images", d, cfg, tmp / "dedup.parquet",
                                     runner=cfg.runner, resolve_model=model_resolver(clip))
        shutil.rmtree(tmp / "_embeddings", ignore_errors=True)
        return counts

    from imagegen import semdedup
    inputs = {"download": download.id}
    code = stage_code("dedup")
    if cfg.semantic is not None:  # ids of phash-only configs stay as they were
        inputs.update(_clip_inputs(clip, cfg.semantic_model))
        code = stable_hash({"dedup": code, "semdedup": code_version(semdedup)})
    params = _params("dedup", cfg)
    if cfg.semantic is None:
        for k in ("semantic", "semantic_model", "semantic_batch_size"):
            params.pop(k, None)
    return _run_stage(root, "dedup", inputs, params, code, body)


def model_resolver(clip: StageResult | None) -> Callable[[str], str]:
    """Map the alias 'world' to the reference CLIP's open_clip local-dir; pass other specs through."""
    def resolve(spec: str) -> str:
        if spec == "world":
            if clip is None:
                raise ValueError("model 'world' names the embedded world's reference CLIP, which only "
                                 "exists for source.kind='world'; give an open_clip spec such as "
                                 "'ViT-B-32:laion2b_s34b_b79k'")
            return f"local-dir:{clip.path}"
        return spec
    return resolve


def _clip_inputs(clip: StageResult | None, *specs: str | None) -> dict[str, Any]:
    return {"reference_clip": clip.id} if clip is not None and "world" in specs else {}


def filter_identity(download: StageResult, dedup: StageResult, cfg: FilterConfig,
                    clip: StageResult | None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(inputs, params, code) the filter stage id hashes: the filter package's code and every
    configured model/list file (sha256, :func:`imagegen.filters.stage_identity`) are in ``code``."""
    from imagegen import filters as filters_pkg

    inputs = {"download": download.id, "dedup": dedup.id, **_clip_inputs(clip, *filter_mod.model_specs(cfg))}
    code = stable_hash({"stage": stage_code("filter", cfg), "filters": filters_pkg.stage_identity(cfg)})
    return inputs, _params("filter", cfg), code


def filter_stage(root: Path, download: StageResult, dedup: StageResult, cfg: FilterConfig,
                 clip: StageResult | None) -> StageResult:
    inputs, params, code = filter_identity(download, dedup, cfg, clip)
    # per-part scores, content-addressed by (the part file's sha256, filter params, code, models): a
    # rerun of a crashed stage rescores only the missing parts, a new version only its new parts
    part_ns = stable_hash({"clip": inputs.get("reference_clip"), "params": params, "code": code})[:16]

    def body(tmp: Path, card: dict[str, Any]) -> dict[str, Any]:
        return filter_mod.run_filter(Path(download.path), Path(dedup.path) / "dedup.parquet", cfg,
                                     tmp / "filter.parquet", resolve_model=model_resolver(clip), runner=cfg.runner,
                                     part_cache=root / "parts" / "filter" / part_ns,
                                     part_key=lambda part: file_sha256(part)[:32])

    return _run_stage(root, "filter", inputs, params, code, body)


def recaption_stage(root: Path, download: StageResult, filtered: StageResult, cfg: RecaptionConfig,
                    clip: StageResult | None) -> StageResult:
    def body(tmp: Path, card: dict[str, Any]) -> dict[str, Any]:
        f = pd.read_parquet(Path(filtered.path) / "filter.parquet", columns=["key", "keep"])
        keys = f.loc[f["keep"], "key"].tolist()
        rcfg = cfg
        if cfg.backend == "clip_retrieval":
            rcfg = cfg.model_copy(update={"model": model_resolver(clip)(cfg.model or "world")})
        return recaption_mod.run_recaption(Path(download.path) / "images", keys, rcfg, tmp / "captions.parquet")

    return _run_stage(root, "recaption", {"download": download.id, "filter": filtered.id,
                                          **_clip_inputs(clip, cfg.model if cfg.backend == "clip_retrieval" else None)},
                      _params("recaption", cfg), stage_code("recaption", cfg), body)


def shard_stage(root: Path, name: str, config: CurateConfig, download: StageResult, dedup: StageResult,
                filtered: StageResult, captions: StageResult, world: StageResult | None,
                clip: StageResult | None) -> StageResult:
    """Write the dataset: shards, manifest, accounting of every input row, and the card."""
    inputs = {"download": download.id, "dedup": dedup.id, "filter": filtered.id, "recaption": captions.id}
    params, code = _params("shard", config.shard), stage_code("shard")
    # the shard tasks' outputs, named by the stage id: a rerun after a crash reuses the finished ones
    work = root / "parts" / "shard" / stage_id("shard", inputs, params, code)

    def body(tmp: Path, card: dict[str, Any]) -> dict[str, Any]:
        return build_dataset(tmp, card, name, config, download, dedup, filtered, captions, world, clip, work)

    res = _run_stage(root, "shard", inputs, params, code, body, final=lambda sid: datasets_dir(root) / sid)
    register_name(root, name, res.id)
    return res


def build_dataset(out: Path, card: dict[str, Any], name: str, config: CurateConfig, download: StageResult,
                  dedup: StageResult, filtered: StageResult, captions: StageResult,
                  world: StageResult | None, clip: StageResult | None, work: Path | None = None) -> dict[str, Any]:
    """The shard stage's body: writes into ``out``; ``work`` holds the shard tasks' outputs until the
    tars are in place (default: inside ``out``, so nothing survives a crash)."""
    ddir = Path(download.path)
    # the columns the accounting and the samples' metadata use, concatenated lazily from the ledger's parts
    ledger = read_ledger(ddir, ["row_id", "url", "key", "status", "reason", "original_width", "original_height",
                                "sha256", "source_sha256"])
    dd = pd.read_parquet(Path(dedup.path) / "dedup.parquet")
    ff = pd.read_parquet(Path(filtered.path) / "filter.parquet")
    cc = pd.read_parquet(Path(captions.path) / "captions.parquet")
    kept = ff.loc[ff["keep"], "key"].tolist()
    if not kept:  # before plan_shards, which refuses an empty key list without saying why
        _refuse_empty(out, ddir, account_rows(ledger, dd, ff))

    # compact columns only: the metadata table (no image), then the shards part-parallel on the runner
    table, score_cols = shard_parts.metadata_table(ledger, dd, ff, cc, kept)
    grid_keys = kept[:16]
    infos, tar_of, grid, tasks = shard_parts.write_dataset_shards(
        ddir / "images", table, score_cols, config.shard, out / "shards",
        work if work is not None else out / "_work", runner=config.runner, grid_keys=grid_keys)
    manifest = table.drop(columns=["caption"])
    manifest.insert(1, "shard", tar_of.loc[kept].to_numpy())
    manifest["caption"] = table["caption"].to_numpy()
    del table
    ffi, cci = ff.set_index("key"), cc.set_index("key")
    # the filters' extra columns (OCR text, NudeNet detections, blocklist matches): manifest only,
    # so the shards' bytes do not depend on which detectors ran
    extra = [c for c in ff.columns if c not in {"key", "row_id", "duplicate", "keep", "reason"}
             and not c.endswith(("_score", "_pass"))]
    for c in extra:
        manifest[c] = ffi.loc[kept, c].to_numpy() if kept else []
    manifest.to_parquet(out / "manifest.parquet", index=False)
    accounting = account_rows(ledger, dd, ff)
    accounting.to_parquet(out / "accounting.parquet", index=False)

    counts = {
        "download": download.counts, "dedup": dedup.counts, "filter": filtered.counts,
        "recaption": captions.counts,
        "shard": {"samples": len(kept), "shards": len(infos), "bytes": int(sum(i.bytes for i in infos)),
                  "tasks": tasks},
        "accounting": accounting["outcome"].value_counts().sort_index().to_dict(),
    }
    card.update({
        "name": name,
        "source": {"kind": config.source.kind, "url_list": config.source.url_list,
                   "world_stage": world.id if world else None},
        "stage_ids": {"world": world.id if world else None, "reference_clip": clip.id if clip else None,
                      "download": download.id, "dedup": dedup.id, "filter": filtered.id,
                      "recaption": captions.id},
        "config": config.model_dump(mode="json"),
        "code_versions": {r.stage: read_card(Path(r.path)).get("code_version")
                          for r in (world, download, dedup, filtered, captions) if r is not None},
        "shards": [{"name": i.name, "count": i.count, "bytes": i.bytes, "sha256": i.sha256} for i in infos],
        "reference_clip": clip.counts if clip else None,
        "parent": _parent_card(root_of(download), read_card(Path(download.path)).get("parent")),
    })
    if world is not None:
        card["world_report"] = world_report(Path(world.path), accounting, cc)
    _write_grid(out, grid_keys, grid, cci)
    return counts


def _refuse_empty(out: Path, download_dir: Path, accounting: pd.DataFrame) -> None:
    """No row survived: keep the accounting and the ledger where the user can read them, then refuse.

    They go to ``<data root>/failed/<dataset id>/`` (the dataset folder itself never appears: an
    empty dataset is not a dataset)."""
    sid = out.name.split(".tmp-", 1)[0]
    where = out.parent.parent / "failed" / sid
    where.mkdir(parents=True, exist_ok=True)
    accounting.to_parquet(where / "accounting.parquet", index=False)
    ledger_mod.compact_copy(download_dir, ledger_mod.ledger_dataset(download_dir).schema.names,
                            where / "ledger.parquet")  # every column, streamed from the ledger's parts
    outcomes = accounting["outcome"].value_counts().to_dict()
    raise ValueError(f"no sample to shard: none of the {len(accounting)} input rows survived "
                     f"(outcomes: {outcomes}); every row's outcome is in {where / 'accounting.parquet'} "
                     f"and the download ledger in {where / 'ledger.parquet'}")


def root_of(res: StageResult) -> Path:
    return Path(res.path).parents[2]  # <root>/stages/<stage>/<id>


def _parent_card(root: Path, parent: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parent version of an incremental dataset: its id, name and version number."""
    if not parent:
        return None
    from imagegen.registry import versions_of

    ref = get_dataset(root, parent["dataset"])
    out = {"id": ref.id, "download": parent["download"], "name": ref.card.get("name")}
    vs = versions_of(root, ref.card.get("name", ""))
    if ref.id in vs:
        out["version"] = vs.index(ref.id) + 1
    return out


def account_rows(ledger: pd.DataFrame, dedup: pd.DataFrame, filtered: pd.DataFrame) -> pd.DataFrame:
    """One row per input row with its final outcome: kept, or the stage and reason that dropped it."""
    acc = ledger[["row_id", "url", "key", "status", "reason"]].copy()
    f = filtered.set_index("key")
    outcome = []
    for key, status, reason in zip(acc["key"], acc["status"], acc["reason"]):
        if status == "skipped":
            outcome.append(f"skipped:{reason}")
        elif status == "failed":
            outcome.append(f"download_failed:{reason}")
        elif key not in f.index:
            outcome.append("lost")  # must never happen; the check below makes it loud
        elif bool(f.at[key, "keep"]):
            outcome.append("kept")
        else:
            outcome.append(f"filtered:{f.at[key, 'reason']}")
    acc["outcome"] = outcome
    if (acc["outcome"] == "lost").any() or len(acc) != len(ledger):
        raise AssertionError(f"rows lost between download and filter: {acc[acc['outcome'] == 'lost']}")
    return acc


def world_report(world_dir: Path, accounting: pd.DataFrame, captions: pd.DataFrame) -> dict[str, Any]:
    """Where each planted fault ended up, and caption accuracy before/after recaptioning."""
    from imagegen.world.captions import caption_accuracy
    from imagegen.world.publish import read_truth

    truth = read_truth(world_dir)
    acc = accounting.merge(truth[["row_id", "planted", "objects", "relation", "true_caption", "caption_noise"]],
                           on="row_id")
    by_planted = {p: g["outcome"].value_counts().to_dict() for p, g in acc.groupby("planted")}
    report: dict[str, Any] = {"outcome_by_planted": by_planted}
    kept = acc[acc["outcome"] == "kept"].merge(captions[["key", "original_caption", "caption"]], on="key")
    if len(kept):
        objs = [json.loads(o) for o in kept["objects"]]
        rels = [json.loads(r) if isinstance(r, str) else None for r in kept["relation"]]
        truth_caps = kept["true_caption"].tolist()
        for label, col in (("alt_text", "original_caption"), ("final", "caption")):
            report[f"caption_accuracy_{label}"] = caption_accuracy(
                kept[col].tolist(), objs, truth_relations=rels, truth_captions=truth_caps)
    return report


def _write_grid(out: Path, keys: list[str], images: dict[str, tuple[bytes, str]], captions: pd.DataFrame) -> None:
    """A PNG grid of the first samples with their captions, for the card and the Prefect artifact."""
    import io

    from PIL import Image, ImageDraw

    if not keys:
        return
    cols, cell, text_h = 4, 128, 28
    rows = (len(keys) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, k in enumerate(keys):
        im = Image.open(io.BytesIO(images[k][0])).convert("RGB").resize((cell, cell), Image.NEAREST)
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(im, (x, y))
        cap = str(captions.loc[k, "caption"])
        draw.text((x + 2, y + cell + 1), cap[:22], fill="black")
        draw.text((x + 2, y + cell + 13), cap[22:44], fill="black")
    grid.save(out / "samples.png")


# ---------------------------------------------------------------------------- the whole DAG

def check_preconditions(config: CurateConfig, root: Path) -> None:
    """Refuse bad input before any work: unwritable root, unreadable URL list, taken port.
    A refused request leaves no data root behind that it created itself."""
    created = not root.exists()
    ensure_writable(root)
    try:
        for spec in sorted({config.runner, *(getattr(config, st).runner or config.runner for st in RUNNER_STAGES)}):
            check_runner(spec, root)
        check_distributor(config.download.distributor, config.download.distributor_address)
        if config.download.parent:
            parent_download(root, config.download.parent)  # a known dataset whose download is still here
            if config.download.append_list:
                download_mod.scan_url_list(config.download.append_list, config.download.url_col,
                                           config.download.caption_col, config.download.on_duplicate_urls)
        _check_inputs(config)
    except BaseException:
        if created:
            try:
                root.rmdir()  # only if still empty
            except OSError:
                pass
        raise


def _world_models(obj: Any, where: str) -> list[str]:
    """Dotted paths of every ``model: 'world'`` setting under ``obj`` (a dumped config)."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in
                ([f"{where}.{k}"] if k == "model" and v == "world" else _world_models(v, f"{where}.{k}"))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _world_models(v, f"{where}[{i}]")]
    return []


def _check_inputs(config: CurateConfig) -> None:
    if config.source.kind == "url_list":  # every problem at once, not one per attempt
        problems = []
        used = _world_models(config.filter.model_dump(mode="json"), "filter") + \
            _world_models(config.recaption.model_dump(mode="json"), "recaption")
        if used:
            problems.append(f"{', '.join(used)} use the embedded world's models, which only exist for "
                            "source.kind='world'; for a URL list set them to real models (e.g. --set "
                            "filter.clip_score.model=ViT-B-32:laion2b_s34b_b79k) or turn them off")
        try:
            download_mod.scan_url_list(config.source.url_list, config.download.url_col,
                                       config.download.caption_col, config.download.on_duplicate_urls)
        except download_mod.InputError as exc:
            problems.insert(0, str(exc))
        if problems:
            raise download_mod.InputError("\n".join(problems) if len(problems) == 1 else
                                          f"{len(problems)} problems:\n" + "\n".join(f"- {m}" for m in problems))
    elif config.source.world_port:
        import socket

        if config.source.world_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"world_host {config.source.world_host!r} is not loopback; the world server "
                             "only listens on loopback")
        with socket.socket() as s:
            # as the world server does (allow_reuse_address): a port whose last connections are in
            # TIME_WAIT is free for it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((config.source.world_host, config.source.world_port))
            except OSError as exc:
                raise OSError(f"port {config.source.world_port} on {config.source.world_host} is already in use "
                              f"({exc.strerror}); pick another with source.world_port or 0 for any free port") from exc


StageRunner = Callable[..., StageResult]


def run_stages(config: CurateConfig, root: Path, run: StageRunner | None = None,
               progress: Callable[[str, StageResult], None] | None = None) -> StageResult:
    """The one order of the curate stages: (world, reference CLIP,) download, dedup, filter,
    recaption, shard; registers the dataset's name and returns the shard stage's result.

    ``run(stage, fn, *args)`` runs one stage: by default ``fn(*args)`` in this process; the curate
    flow passes one that runs the stage's Prefect task instead (``flows/curate.py``)."""
    call: StageRunner = run or (lambda stage, fn, *args: fn(*args))
    note = progress or (lambda stage, res: None)

    def step(stage: str, fn: Callable[..., StageResult], *args: Any) -> StageResult:
        res = call(stage, fn, *args)
        note(stage, res)
        return res

    world = clip = None
    if config.source.kind == "world":
        world = step("world", world_stage, root, config.source)
        clip = step("reference_clip", reference_clip_stage, root, config.source, config.reference_clip)
    dl = step("download", download_stage, root, config.source, world, config.download)
    dd = step("dedup", dedup_stage, root, dl, config.dedup, clip)
    ff = step("filter", filter_stage, root, dl, dd, config.filter, clip)
    rc = step("recaption", recaption_stage, root, dl, ff, config.recaption, clip)
    ds = step("shard", shard_stage, root, config.name, config, dl, dd, ff, rc, world, clip)
    register_name(root, config.name, ds.id)  # a stage served from a cache did not register it
    return ds


def curate(config: CurateConfig, root: Path, progress: Callable[[str, StageResult], None] | None = None) -> DatasetRef:
    """Run the whole curate DAG without Prefect; returns the registered dataset.

    A ``dask``/``ray`` runner is started once for every stage's map steps and closed at the end,
    also on an error (:func:`imagegen.executors.shared_executors`)."""
    check_preconditions(config, root)
    config = resolve_parent(config, root)
    with shared_executors():
        ds = run_stages(config, root, progress=progress)
    return get_dataset(root, ds.id)
