"""Prefect task for ``imagegen import``: a thin wrapper around :func:`imagegen.importers.import_dataset`."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imagegen.importers import ImportConfig, import_dataset


@task(name="import", cache_policy=NO_CACHE)
def import_task(request: ImportConfig, data_root: str) -> dict[str, Any]:
    """Import the request's source into the registry (content-addressed: a repeat is a cache hit);
    returns the result (ids, path, counts)."""
    logger = get_run_logger()
    return import_dataset(request, data_root, progress=logger.info).model_dump()
