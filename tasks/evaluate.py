"""Prefect task for evaluation: a thin wrapper around :func:`imagegen.evaluate.run.run_evaluation`
(:func:`imagegen.evaluate.run.evaluate`, plus the NFE when the summary lacks it).

No Prefect result caching: the evaluation folder ``<root>/evals/<id>`` is the cache (its id
hashes the checkpoint's tensors or the folder's files, the settings and the metric code), so
the same request again reuses the generated images and the cached reference features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imagegen.evaluate.request import EvalRequest
from imagegen.report import metric_lines


def task_run_name() -> str:
    """``evaluate <run> @ <steps> steps`` (or ``evaluate folder <name>``) in the Prefect UI."""
    from prefect.runtime import task_run

    req = task_run.parameters.get("request")
    if isinstance(req, dict):
        req = EvalRequest.model_validate(req)
    if not isinstance(req, EvalRequest):
        return "evaluate"
    if req.run is not None:
        steps = "default steps" if req.steps is None else f"{req.steps} step{'s' if req.steps != 1 else ''}"
        return f"evaluate {req.run} @ {steps}"
    return f"evaluate folder {Path(str(req.folder)).name}"


@task(name="evaluate", task_run_name=task_run_name, retries=0, cache_policy=NO_CACHE, persist_result=False)
def evaluate(request: EvalRequest, data_root: str) -> dict[str, Any]:
    """Evaluate the run or folder ``request`` names under ``data_root``; the evaluation summary."""
    from imagegen.evaluate.run import run_evaluation  # torch: in the task run, not at the flow's import

    logger = get_run_logger()
    summary = run_evaluation(request, Path(data_root))
    for line in metric_lines(summary):
        logger.info(line)
    for name, why in summary["skipped"].items():
        logger.info("skipped %s: %s", name, why)
    logger.info("evaluation %s in %.1f s (%s)", summary["eval_id"], summary["seconds"], summary["path"])
    return summary
