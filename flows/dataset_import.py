"""The import flow: someone else's images (a folder, WebDataset tars / img2dataset output, a Hugging Face
dataset) registered as an ordinary dataset, as one Prefect flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from imagegen.importers import ImportConfig
from imagegen.paths import data_root as resolve_root
from tasks.dataset_import import import_task


@flow(name="import", log_prints=True)
def import_flow(request: ImportConfig, data_root: str | None = None) -> dict[str, Any]:
    """Import ``request.source`` (``request.kind``: folder | webdataset | hf) into the registry of
    ``data_root``: shards, manifest, accounting (one outcome per input row) and a card, named by the
    rows' content; ``request.curate`` runs the curate DAG's dedup and filter stages on it."""
    logger = get_run_logger()
    root = resolve_root(data_root)
    res = import_task(request, str(root))
    c = res["counts"]
    logger.info("dataset %s (%s): %s samples in %s shards at %s%s", res["name"], res["dataset_id"],
                c["shard"]["samples"], c["shard"]["shards"], res["path"], " (already imported)" if res["cached"] else "")
    return res
