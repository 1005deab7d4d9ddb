"""Prefect task for distillation: a thin wrapper around :func:`imagegen.distill.distill`.

No Prefect result caching: every student is an ordinary training run, and the run folders are
the cache (a rerun reuses finished students and the registered reflow pairs).  Progress of the
student runs goes to a Prefect progress artifact (key ``distill-progress``) and to the task's log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imagegen.distill_config import DistillRequest
from imagegen.report import progress_line
from tasks.train import ProgressArtifact

PROGRESS_KEY = "distill-progress"


class DistillProgress(ProgressArtifact):
    """The train task's progress artifact, under the key ``distill-progress`` and spread over the
    student rounds: round k of n at fraction f reports ``100 * (k + f) / n`` percent.

    The trainer's callback does not say which run it comes from; a new round is recognised by the
    fraction falling back.  A reused (already finished) round reports nothing, so the percentage
    may lag; the task sets 100 at the end."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, description: str, rounds: int,
                 label: str) -> None:
        super().__init__(logger, description, key=PROGRESS_KEY)
        self.rounds, self.label = max(1, rounds), label
        self.round, self.last = 0, 0.0

    def __call__(self, info: dict[str, Any]) -> None:
        fraction = float(info["fraction"])
        if fraction < self.last and self.round + 1 < self.rounds:
            self.round += 1
        self.last = fraction
        self.logger.info("[%s round %d/%d] %s", self.label, self.round + 1, self.rounds, progress_line(info))
        self.set(100.0 * (self.round + fraction) / self.rounds)


@task(name="distill", tags=["gpu"], retries=0, cache_policy=NO_CACHE, persist_result=False)
def distill(request: DistillRequest, data_root: str) -> dict[str, Any]:
    """Train (resume, or reuse) the student run(s) ``request`` describes under ``data_root`` and
    write the NFE report; the summary of :func:`imagegen.distill.distill`."""
    from imagegen import distill as D  # torch: in the task run, not when a worker imports the flow

    logger = get_run_logger()
    rounds = request.rounds()
    prog = DistillProgress(logger, f"{request.method} distillation of run {request.teacher}: {len(rounds)} "
                                   f"student run(s) of {request.steps} steps", len(rounds), request.method)
    summary = D.distill(request, Path(data_root), progress=prog)
    prog.set(100.0)  # every round finished (reused rounds report nothing on their own)
    logger.info("%s student %s from teacher %s (%s)", summary["method"], summary["student_run"],
                summary["teacher_run"], ", ".join(f"{r['steps']} steps: {r['run_id']}"
                                                  f"{' reused' if r['reused'] else ''}" for r in summary["rounds"]))
    return summary
