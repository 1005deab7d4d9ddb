"""The benchmark flow: evaluate a set of runs with identical settings and publish a leaderboard."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.publish import publish_pages
from imagegen.benchmark import already_done, benchmark_card, check_plan, plan
from imagegen.paths import data_root as resolve_root
from imagegen.report import benchmark_pages
from tasks import benchmark as TB
from tasks import evaluate as TE


@flow(name="benchmark", log_prints=True)
def benchmark_flow(runs: list[str] | None = None, families: list[str] | None = None, dataset: str | None = None,
                   settings: dict[str, Any] | None = None, nfe_sweep: list[int] | None = None,
                   data_root: str | None = None) -> dict[str, Any]:
    """Evaluate a set of runs with identical settings and write a leaderboard.

    The set: ``runs`` (ids or unique prefixes), or every finished run of ``families`` (e.g.
    ``["flow", "reflow"]``) and/or trained on ``dataset``; with neither, every finished run.
    ``settings``: evaluation fields applied to every run, e.g. ``{"n_samples": 5000, "steps": 8,
    "metrics": ["fid", "clipscore"]}``.  ``nfe_sweep``: step counts each run is evaluated at too
    (e.g. ``[1, 2, 4, 8]``).  Evaluations are reused when the same (run, settings) comes again;
    the artifacts ``leaderboard`` (table) and ``leaderboard-report`` (markdown with plots) gain
    a version every run.
    """
    logger = get_run_logger()
    root = resolve_root(data_root)
    jobs = plan(root, runs, families, dataset, settings, nfe_sweep)  # validated before any work
    check_plan(jobs, root)
    logger.info("benchmark: %d evaluations of %d runs", len(jobs), len({j.run for j in jobs}))
    summaries: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for req in jobs:  # one after another: evaluations share the reference cache and the device
        if already_done(req, summaries):
            continue
        state = TE.evaluate(req, str(root), return_state=True)
        if state.is_completed():
            summaries.append(state.result())
        else:
            exc = state.result(raise_on_failure=False)
            failed.append({"run": req.run, "steps": req.steps, "error": f"{type(exc).__name__}: {exc}"})
            logger.error("evaluation of run %s at %s steps failed: %s", req.run, req.steps, exc)
    if not summaries:
        raise RuntimeError(f"every evaluation failed: {failed}")
    board = TB.leaderboard(summaries, str(root), benchmark_card(settings, nfe_sweep, runs, families, dataset, failed))
    publish_pages(benchmark_pages(board, failed))
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} evaluations failed (the leaderboard "
                           f"{board['path']} has the others): {failed}")
    return {**board, "failed": failed}
