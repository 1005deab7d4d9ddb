"""The control benchmark flow: a base run and its controls (ControlNet, trained inpainting) scored
against held-out world scenes (the evaluation metric ``control``, imagegen/evaluate/control.py),
published as a leaderboard by the benchmark flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.benchmark import benchmark_flow
from imagegen.benchmark import check_plan, control_plan
from imagegen.paths import data_root as resolve_root


@flow(name="control-benchmark", log_prints=True)
def control_benchmark_flow(base: str, controls: list[str] | None = None, settings: dict[str, Any] | None = None,
                           data_root: str | None = None) -> dict[str, Any]:
    """Score ``base`` (a run id or unique prefix: its inpainting and SDEdit rows) and its ``controls``
    (ControlNet / inpainting runs built on it; by default every finished one) on held-out world scenes
    and write the leaderboard (artifacts ``leaderboard`` and ``leaderboard-report``).

    ``settings``: evaluation fields for every run, e.g. ``{"control_scenes": 256, "steps": 20,
    "guidance": 2.0}``; ``metrics`` (default ``["control"]``) must hold ``control``.
    """
    root = resolve_root(data_root)
    jobs = control_plan(root, base, controls, settings)  # validated before any work
    check_plan(jobs, root)
    runs = [str(j.run) for j in jobs]
    get_run_logger().info("control benchmark: base %s and %d control run(s) %s", runs[0], len(runs) - 1, runs[1:])
    return benchmark_flow(runs=runs, settings={**(settings or {}), "metrics": list(jobs[0].metrics)},
                          data_root=str(root))
