"""Prefect task for evaluation: a thin wrapper around :func:`run_evaluation`
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

from imagegen.evaluate.run import EvalRequest, evaluate as evaluate_request


def measured_nfe(root: Path, run_id: str, sampler: str | None, steps: int | None) -> int:
    """The network evaluations the run's sampler makes at ``steps``: one image sampled from zero
    noise (the NFE does not depend on the noise, the condition or the guidance scale)."""
    import torch

    from imagegen.train.runs import get_run
    from models.teacher import checkpoint_family

    ref = get_run(root, run_id)
    if ref.checkpoint is None:
        raise LookupError(f"run {run_id} has no checkpoint to count the NFE of")
    fam = checkpoint_family(ref.checkpoint)
    x_T = torch.zeros((1, fam.cfg.channels, fam.cfg.image_size, fam.cfg.image_size))
    res = fam.sample_result(1, sampler=sampler, steps=steps, x_T=x_T, generator=torch.Generator().manual_seed(0))
    return int(res.nfe)


def run_evaluation(request: EvalRequest, root: Path) -> dict[str, Any]:
    """:func:`imagegen.evaluate.run.evaluate`, with ``nfe`` filled in when it comes back empty.

    ``evaluate`` reports the NFE of the sampling it does; an evaluation that reuses its
    generated set, or computes GenEval only, returns ``nfe=None``.  The leaderboard plots
    metrics against NFE, so it is counted here from one sample."""
    summary = evaluate_request(request, root)
    if summary.get("nfe") is None and summary.get("run_id"):
        summary = {**summary, "nfe": measured_nfe(root, summary["run_id"], summary.get("sampler"),
                                                  summary.get("steps"))}
    return summary


def metric_lines(summary: dict[str, Any]) -> list[str]:
    """``name: value`` for every metric of an evaluation summary (what ``imagegen evaluate`` prints)."""
    return [f"{name}: {value:.6g}" if isinstance(value, (int, float)) else f"{name}: {value}"
            for name, value in summary["metrics"].items()]


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
    logger = get_run_logger()
    summary = run_evaluation(request, Path(data_root))
    for line in metric_lines(summary):
        logger.info(line)
    for name, why in summary["skipped"].items():
        logger.info("skipped %s: %s", name, why)
    logger.info("evaluation %s in %.1f s (%s)", summary["eval_id"], summary["seconds"], summary["path"])
    return summary
