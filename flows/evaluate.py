"""The evaluate flow: FID/FD + KID, CLIPScore and GenEval of one run or image folder, as one Prefect flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.publish import publish_pages
from imagegen.evaluate.request import EvalRequest
from imagegen.paths import data_root as resolve_root
from imagegen.report import evaluate_pages, metric_lines
from imagegen.requests import build_eval_request, check_eval_request
from tasks import evaluate as T


@flow(name="evaluate", log_prints=True)
def evaluate_flow(request: EvalRequest | None = None, run: str | None = None, folder: str | None = None,
                  overrides: list[str] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Evaluate a training/distillation ``run`` (id or unique prefix: its latest checkpoint, sampled
    to disk first) or a ``folder`` of images: FID/FD + KID, CLIPScore, GenEval.

    ``overrides`` such as ``["metrics=[\\"fid\\",\\"kid\\"]", "steps=8", "n_samples=5000",
    "reference=world-smoke"]`` set any field of the request.  The same request again reuses the
    generated images.
    """
    logger = get_run_logger()
    req = build_eval_request(request, run, folder, overrides)  # validated before any work
    root = resolve_root(data_root)
    check_eval_request(req, root)
    summary = T.evaluate(req, str(root))
    publish_pages(evaluate_pages(summary, req))
    logger.info("evaluation %s: %s%s", summary["eval_id"], "; ".join(metric_lines(summary)) or "no metrics",
                "".join(f"; skipped {m} ({why})" for m, why in summary["skipped"].items()))
    return summary
