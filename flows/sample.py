"""The sample flow: images from a run, PNGs with their generation parameters and a grid, as one Prefect flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from imagegen.paths import data_root as resolve_root
from imagegen.sample import Prepared, SampleRequest
from tasks import sample as T

SUMMARY_KEY = "sample-grid"


def sample_markdown(summary: dict[str, Any]) -> str:
    from imagegen.report import png_data_uri

    lines = [f"# Samples of run `{summary['run_id']}` ({summary['family']})", "",
             f"{summary['n_images']} image(s) in `{summary['out']}`: {summary['sampler']}, {summary['steps']} steps, "
             f"guidance {summary['guidance']:g}" + (f", watermark {summary['watermark']!r}" if summary["watermark"] else ""),
             "", "Prompts: " + "; ".join(f"`{p}`" for p in summary["prompts"] if p) or "(unconditional)"]
    uri = png_data_uri(summary.get("grid"))
    if uri:
        lines += ["", f"![grid]({uri})"]
    return "\n".join(lines)


@flow(name="sample", log_prints=True)
def sample_flow(request: SampleRequest, data_root: str | None = None) -> dict[str, Any]:
    """Generate ``request.n`` images per prompt from a run (``request.run``: id or unique prefix) into
    ``request.out`` (default ``<data root>/samples/<id>``): PNGs whose ``parameters`` text chunk holds
    every generation setting, a grid, and optionally an invisible dwtDct watermark."""
    logger = get_run_logger()
    root = resolve_root(data_root)
    Prepared(request, root)  # unknown run, class name, prompts file: refused before the task
    summary = T.sample(request, str(root))
    create_markdown_artifact(key=SUMMARY_KEY, markdown=sample_markdown(summary),
                             description=f"Samples {summary['sample_id']} of run {summary['run_id']}")
    logger.info("%d image(s) of run %s in %s", summary["n_images"], summary["run_id"], summary["out"])
    return summary
