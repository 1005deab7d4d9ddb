"""The curate flow: download -> dedup -> filter -> recaption -> shard, as one Prefect flow."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from imagegen import curate as C
from imagegen.paths import data_root as resolve_root
from imagegen.presets import CURATE_PRESETS, build_config
from tasks import curate as T


def _fresh(task: Any, *args: Any) -> dict[str, Any]:
    """Run a task; if its cached result points at a folder that is gone, run it again for real."""
    res = task(*args)
    if not Path(res["path"]).exists():
        res = task.with_options(refresh_cache=True)(*args)
    return res


@flow(name="curate", log_prints=True)
def curate_flow(preset: Literal["smoke", "demo"] | None = "smoke", config: C.CurateConfig | None = None,
                overrides: list[str] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Curate a dataset into reusable WebDataset shards and register it.

    Give either ``config`` (every parameter) or a ``preset`` plus ``overrides`` such as
    ``["download.timeout=3", "source.publish.n_images=500"]``.
    """
    logger = get_run_logger()
    cfg = config if config is not None else build_config(C.CurateConfig, CURATE_PRESETS, preset, overrides)
    root = resolve_root(data_root)
    C.check_preconditions(cfg, root)
    cfg = C.resolve_parent(cfg, root)  # a parent version by its immutable id
    r = str(root)
    world = clip = None
    if cfg.source.kind == "world":
        world = _fresh(T.publish_world, r, cfg.source)
        clip = _fresh(T.reference_clip, r, cfg.source, cfg.reference_clip)
    dl = _fresh(T.download, r, cfg.source, world, cfg.download)
    dd = _fresh(T.dedup, r, dl, cfg.dedup, clip)
    ff = _fresh(T.filter_images, r, dl, dd, cfg.filter, clip)
    rc = _fresh(T.recaption, r, dl, ff, cfg.recaption, clip)
    ds = _fresh(T.shard, r, cfg.name, cfg, dl, dd, ff, rc, world, clip)
    C.register_name(root, cfg.name, ds["id"])
    summary = publish_curate_artifacts(ds)
    logger.info("dataset %s (%s) at %s", cfg.name, ds["id"], ds["path"])
    return summary


def curate_summary(dataset_path: Path) -> dict[str, Any]:
    card = json.loads((dataset_path / "card.json").read_text())
    counts = card["counts"]
    return {"dataset_id": card["id"], "name": card.get("name"), "path": str(dataset_path),
            "samples": counts["shard"]["samples"], "shards": counts["shard"]["shards"],
            "input_rows": counts["download"]["input_rows"], "accounting": counts["accounting"],
            "stage_ids": card["stage_ids"]}


def stage_count_rows(card: dict[str, Any]) -> list[dict[str, Any]]:
    """Counts per stage: rows in, kept, dropped by reason."""
    c = card["counts"]
    dl, ff = c["download"], c["filter"]
    rows = [{"stage": "download", "in": dl["input_rows"], "kept": dl["success"],
             "dropped": json.dumps(dl["reasons"])}]
    dup = {k: v for k, v in ff["dropped"].items() if k.endswith("_duplicate")}
    flt = {k: v for k, v in ff["dropped"].items() if not k.endswith("_duplicate")}
    rows.append({"stage": "dedup", "in": ff["images"], "kept": ff["images"] - sum(dup.values()),
                 "dropped": json.dumps(dup)})
    rows.append({"stage": "filter", "in": ff["images"] - sum(dup.values()), "kept": ff["kept"],
                 "dropped": json.dumps(flt)})
    rc = c["recaption"]
    rows.append({"stage": "recaption", "in": ff["kept"], "kept": ff["kept"], "dropped": json.dumps({}),
                 "note": json.dumps({k: v for k, v in rc.items() if not isinstance(v, (dict, list))})})
    rows.append({"stage": "shard", "in": ff["kept"], "kept": c["shard"]["samples"], "dropped": json.dumps({}),
                 "note": f"{c['shard']['shards']} shards, {c['shard']['bytes']} bytes"})
    return rows


def curate_markdown(card: dict[str, Any], dataset_path: Path) -> str:
    rows = stage_count_rows(card)
    lines = [f"# Dataset `{card.get('name')}` ({card['id']})", "", f"Path: `{dataset_path}`", "",
             "| stage | in | kept | dropped |", "|---|---:|---:|---|"]
    lines += [f"| {r['stage']} | {r['in']} | {r['kept']} | {r['dropped']} |" for r in rows]
    wr = card.get("world_report")
    if wr and "caption_accuracy_final" in wr:
        lines += ["", "Caption accuracy against the world's ground truth (kept rows): "
                  f"alt text {json.dumps(wr['caption_accuracy_alt_text'])}, "
                  f"after recaptioning {json.dumps(wr['caption_accuracy_final'])}"]
    if card.get("reference_clip"):
        lines += ["", f"Reference CLIP: {json.dumps(card['reference_clip'])}"]
    grid = dataset_path / "samples.png"
    if grid.is_file():
        b64 = base64.b64encode(grid.read_bytes()).decode()
        lines += ["", "## Samples and their captions", "", f"![samples](data:image/png;base64,{b64})"]
    return "\n".join(lines)


def publish_curate_artifacts(ds: dict[str, Any]) -> dict[str, Any]:
    path = Path(ds["path"])
    card = json.loads((path / "card.json").read_text())
    create_table_artifact(key="curate-stage-counts", table=stage_count_rows(card),
                          description=f"Counts per stage for dataset {card['id']}")
    create_markdown_artifact(key="curate-summary", markdown=curate_markdown(card, path),
                             description=f"Dataset card summary for {card['id']}")
    return curate_summary(path)
