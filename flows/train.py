"""The train flow: train (or resume, or reuse) one model on a registered dataset, as one Prefect flow."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger

from flows.publish import publish_pages
from imagegen.paths import data_root as resolve_root
from imagegen.report import train_pages
from imagegen.requests import build_train_request
from imagegen.train.config import TrainRequest
from tasks import train as T


@flow(name="train", log_prints=True)
def train_flow(preset: Literal["smoke", "demo", "gpu"] | None = "smoke", request: TrainRequest | None = None,
               overrides: list[str] | None = None, dataset: str | None = None, family: str | None = None,
               steps: int | None = None, nproc: int | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Train a model on a registered dataset; the same request again resumes or reuses its run.

    Give ``request`` (every parameter) or a ``preset``; then ``overrides`` such as
    ``["train.steps=50", "train.model.image_size=16"]`` and the named parameters (``dataset``,
    ``family``, ``steps``, ``nproc``) are applied over it.
    """
    logger = get_run_logger()
    root = resolve_root(data_root)
    req = build_train_request(preset, request, overrides, dataset, family, steps, nproc, root=root)  # validated first
    summary = T.train.with_options(timeout_seconds=T.timeout_seconds(req))(req, str(root))
    publish_pages(train_pages(summary, req))
    logger.info("run %s on dataset %s: step %s, losses %s (%s)", summary["run_id"], summary["dataset_id"],
                summary.get("step"), summary.get("last_losses"), summary["run_dir"])
    return summary
