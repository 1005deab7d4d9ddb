"""The pipeline flow: curate -> train -> distill -> evaluate (teacher and student) as subflows, and a report."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger

from flows.curate import curate_flow
from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.publish import publish_pages
from flows.train import train_flow
from imagegen import pipeline as P
from imagegen.paths import data_root as resolve_root
from imagegen.report import pipeline_pages


def _subflow(fn: Any, name: str, **params: Any) -> dict[str, Any]:
    """Run a stage flow as a subflow of this one; its result plus its flow run id.  A failed stage
    raises its own exception here, so the pipeline fails at that stage."""
    state = fn.with_options(flow_run_name=name)(**params, return_state=True)
    result = state.result()  # raises the stage's exception when it failed
    return {**result, "flow_run_id": str(state.state_details.flow_run_id)}


def subflow_stages() -> P.Stages:
    """The stages as Prefect subflows (each with its own artifacts in the UI); only ids, paths and
    validated requests are passed."""
    return P.Stages(
        curate=lambda cfg, root: _subflow(curate_flow, f"curate {cfg.name}", config=cfg, data_root=str(root)),
        train=lambda req, root: _subflow(train_flow, f"train {req.train.family} on {req.dataset}", request=req,
                                         data_root=str(root)),
        distill=lambda req, root: _subflow(distill_flow, f"distill {req.method} {req.teacher}", request=req,
                                           data_root=str(root)),
        evaluate=lambda req, root, role: _subflow(evaluate_flow, f"evaluate {role} {req.run}", request=req,
                                                  data_root=str(root)),
    )


@flow(name="pipeline", log_prints=True)
def pipeline_flow(preset: Literal["smoke", "demo", "gpu"] | None = "smoke", request: P.PipelineRequest | None = None,
                  overrides: list[str] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """The whole DAG: curate -> train -> distill -> evaluate teacher and student, then a report.

    Give ``request`` (every parameter) or a ``preset``; ``overrides`` such as ``["train.family=ddpm",
    "distill.method=null", "curate.n_images=100", "evaluate.n_samples=500"]`` apply over it.  Every
    stage reuses what it already computed (curate stages by content, finished runs, evaluations),
    so running again recomputes only what changed.  Publishes the artifact ``pipeline-report``;
    the report files are under ``<data root>/reports/<id>/``.
    """
    logger = get_run_logger()
    req = P.build_request(preset, request, overrides)  # every stage validated before any work
    root = resolve_root(data_root)
    summary = P.run_pipeline(req, root, subflow_stages(), note=logger.info)
    publish_pages(pipeline_pages(summary))
    result = P.summary_result(summary)
    logger.info("pipeline: dataset %s, teacher %s, student %s; seconds %s; report %s", result["dataset_id"],
                result["teacher_run"], result["student_run"], result["seconds"], result["report"]["markdown"])
    return result

