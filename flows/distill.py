"""The distill flow: a few-step student from a finished teacher run, and the NFE report, as one Prefect flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.publish import publish_pages
from imagegen.distill_config import DistillRequest
from imagegen.paths import data_root as resolve_root
from imagegen.report import distill_pages
from imagegen.requests import build_distill_request, check_distill_request, natural_method
from models.teacher import Method
from tasks import distill as T


@flow(name="distill", log_prints=True)
def distill_flow(request: DistillRequest | None = None, teacher: str | None = None, method: Method | None = None,
                 overrides: list[str] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Distil a finished training run (``teacher``, run id or unique prefix) into a few-step student.

    ``method``: progressive (DDPM v-prediction teacher), reflow or dmd (flow teacher), consistency
    (EDM teacher) or ict (consistency training on an EDM run's data, the run as reference); named
    or inside ``request``, else the one the teacher's family fits (flow ->
    reflow, ddpm -> progressive, edm -> consistency).  ``overrides`` such as
    ``["steps=2000", "target_steps=2", "report_nfe=[1,2,4]"]`` set any other field of the
    request.  The same request again reuses the finished student runs.
    """
    logger = get_run_logger()
    root = resolve_root(data_root)
    if request is None and method is None and teacher is not None:
        method = natural_method(root, teacher)
    req = build_distill_request(request, teacher, method, overrides)  # validated before any work
    check_distill_request(req, root)
    summary = T.distill(req, str(root))
    publish_pages(distill_pages(summary, req))
    fewest = min((r for r in summary["report"]["rows"][1:] if r["model"] != "teacher"),
               key=lambda r: r["nfe"], default=None)
    logger.info("%s student %s from teacher %s%s", summary["method"], summary["student_run"], summary["teacher_run"],
                f"; at NFE {fewest['nfe']} MSE to the teacher {fewest['mse_to_reference']:.4g}" if fewest else "")
    return summary
