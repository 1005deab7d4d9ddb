"""The sample flow: images from a run, PNGs with their generation parameters and a grid, as one Prefect flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.publish import publish_pages
from imagegen.paths import data_root as resolve_root
from imagegen.report import sample_pages
from imagegen.sample import Prepared, SampleRequest
from tasks import sample as T


@flow(name="sample", log_prints=True)
def sample_flow(request: SampleRequest, data_root: str | None = None) -> dict[str, Any]:
    """Generate ``request.n`` images per prompt from a run (``request.run``: id or unique prefix) into
    ``request.out`` (default ``<data root>/samples/<id>``): PNGs whose ``parameters`` text chunk holds
    every generation setting, a grid, and optionally an invisible dwtDct watermark."""
    logger = get_run_logger()
    root = resolve_root(data_root)
    Prepared(request, root)  # unknown run, class name, prompts file: refused before the task
    summary = T.sample(request, str(root))
    publish_pages(sample_pages(summary))
    logger.info("%d image(s) of %s in %s", summary["n_images"],
                f"run {summary['run_id']}" if summary.get("run_id") else summary.get("model"), summary["out"])
    return summary
