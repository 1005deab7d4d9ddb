"""Prefect task for training: a thin wrapper around :func:`imagegen.train.runs.train_run`.

No Prefect result caching: the run folder is the cache.  ``train_run`` names the folder by a
hash of (dataset id, trajectory-relevant config, code version), resumes it from its last
checkpoint, or returns it untouched when it has finished.  Progress goes to a Prefect progress
artifact (key ``train-progress``) and to the task's log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from imagegen.report import progress_line
from imagegen.train.config import TrainRequest

PROGRESS_KEY = "train-progress"
# train_run enforces timeout_s itself (with a timeout it trains in torchrun child processes and kills
# the group), marking the run's card failed; the Prefect task timeout only backs it up, after this grace.
TIMEOUT_GRACE_S = 120.0


class ProgressArtifact:
    """The trainer's progress callback: one Prefect progress artifact, created on the first call
    and updated after; a failure to reach the API is logged, never allowed to stop training."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, description: str,
                 key: str = PROGRESS_KEY) -> None:
        self.logger, self.description, self.key = logger, description, key
        self.id: UUID | None = None
        self.failed = False

    def set(self, percent: float) -> None:
        percent = max(0.0, min(100.0, float(percent)))
        try:
            if self.id is None:
                self.id = create_progress_artifact(progress=percent, key=self.key, description=self.description)
            else:
                update_progress_artifact(self.id, percent)
        except Exception as exc:  # noqa: BLE001 - the API being away must not kill a training run
            if not self.failed:
                self.logger.warning("could not publish the progress artifact: %s", exc)
            self.failed = True

    def __call__(self, info: dict[str, Any]) -> None:
        self.logger.info(progress_line(info))
        self.set(100.0 * info["fraction"])


def timeout_seconds(request: TrainRequest) -> float | None:
    return None if request.timeout_s is None else request.timeout_s + TIMEOUT_GRACE_S


@task(name="train", tags=["gpu"], retries=0, cache_policy=NO_CACHE, persist_result=False)
def train(request: TrainRequest, data_root: str) -> dict[str, Any]:
    """Train (resume, or reuse) the run ``request`` describes under ``data_root``; its summary."""
    from imagegen.train import runs  # torch: in the task run, not when a worker imports the flow

    logger = get_run_logger()
    prog = ProgressArtifact(logger, f"training on {request.dataset}: {request.train.family}, "
                                    f"{request.train.steps} steps")
    summary = runs.train_run(request, Path(data_root), progress=prog)
    if prog.id is None:  # nothing trained in this call (a finished run reused): record where it stands
        prog.set(100.0 * summary.get("step", 0) / request.train.steps)
    logger.info("run %s %s at step %s (%s)", summary["run_id"], "reused" if summary.get("reused") else "trained",
                summary.get("step"), summary["run_dir"])
    return summary
