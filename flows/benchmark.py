"""The benchmark flow: evaluate a set of runs with identical settings and publish a leaderboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.evaluate import check_request
from flows.train import data_uri
from imagegen import leaderboard as L
from imagegen.evaluate.run import EvalRequest
from imagegen.paths import data_root as resolve_root
from imagegen.presets import parse_overrides
from tasks import benchmark as TB
from tasks import evaluate as TE

# stable keys: every benchmark run adds a version under the same key in Prefect
TABLE_KEY = "leaderboard"
REPORT_KEY = "leaderboard-report"
PER_RUN = ("run", "folder")


def settings_from_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["steps=8", "n_samples=5000"]`` -> ``{"steps": 8, "n_samples": 5000}`` (values JSON when they parse)."""
    return parse_overrides(overrides)


def plan(root: Path, runs: list[str] | None = None, families: list[str] | None = None, dataset: str | None = None,
         settings: dict[str, Any] | None = None, nfe_sweep: list[int] | None = None) -> list[EvalRequest]:
    """The evaluations of a benchmark, validated: one request per (run, steps).

    Runs: ``runs`` (ids or unique prefixes) or the registry query ``families`` / ``dataset`` over
    finished runs (:func:`imagegen.leaderboard.select_runs`), not both.  Every run gets the same
    ``settings`` (any EvalRequest field but run/folder), at ``settings["steps"]`` (None: each
    family's default) and at each step count of ``nfe_sweep``.  Unless ``settings`` names a
    ``reference``, each run is compared with the dataset its first teacher was trained on (its own
    dataset for a run that is no student), so a reflow student, trained on its teacher's pairs,
    is measured against the same images as its teacher."""
    from imagegen.train.runs import get_run, list_runs

    if runs and (families or dataset):
        raise ValueError("give runs (a list of run ids) or a registry query (families, dataset), not both")
    settings = dict(settings or {})
    per_run = sorted(set(PER_RUN) & set(settings))
    if per_run:
        raise ValueError(f"settings apply to every run the same way; {per_run} cannot be among them "
                         "(name the runs with runs=, or evaluate a folder with the evaluate flow)")
    sweep = list(dict.fromkeys(nfe_sweep or []))
    bad = [s for s in sweep if not isinstance(s, int) or isinstance(s, bool) or s < 1]
    if bad:
        raise ValueError(f"nfe_sweep holds step counts (integers >= 1); got {bad}")
    if runs:
        ids = list(dict.fromkeys(get_run(root, r).id for r in runs))
    else:
        ids = L.select_runs(root, families=families, dataset=dataset)
        if not ids:
            raise ValueError(f"no finished run matches families={families} dataset={dataset!r} under "
                             f"{Path(root) / 'runs'}")
    cards = {r.id: r.card for r in list_runs(root)}
    jobs: list[EvalRequest] = []
    for rid in ids:
        first = L.lineage(rid, cards)[-1]
        ref = cards.get(first, cards[rid]).get("dataset_id")
        # the run's own dataset stays implicit: the same evaluation as the evaluate flow's, reused
        base = {**({"reference": ref} if ref != cards[rid].get("dataset_id") else {}), **settings, "run": rid}
        req = EvalRequest.model_validate(base)
        jobs.append(req)
        jobs += [EvalRequest.model_validate({**base, "steps": s}) for s in sweep if s != req.steps]
    return jobs


def already_done(req: EvalRequest, summaries: list[dict[str, Any]]) -> bool:
    """Whether an evaluation of the same run at the same steps is among ``summaries``: a sweep value
    equal to the family's default step count (known once the run's first evaluation resolved it)."""
    return req.steps is not None and any(s.get("run_id") == req.run and s.get("steps") == req.steps
                                         and s.get("sampler") == (req.sampler or s.get("sampler"))
                                         for s in summaries)


def check_plan(jobs: list[EvalRequest], root: Path) -> None:
    """The evaluate flow's checks before work, once per run (its jobs differ in steps only)."""
    seen: set[str | None] = set()
    for req in jobs:
        if req.run not in seen:
            seen.add(req.run)
            check_request(req, root)


def _steps(n: int | None) -> str:
    return "its default steps" if n is None else f"{n} step{'' if n == 1 else 's'}"


def report_markdown(board: dict[str, Any], failed: list[dict[str, Any]]) -> str:
    import pandas as pd

    df = pd.DataFrame(board["rows"])
    images = {k: uri for k in ("family_plot", "nfe_plot") if (uri := data_uri(board["files"][k]))}
    text = L.leaderboard_markdown(df, images, title=f"Leaderboard `{board['leaderboard_id']}`")
    text += f"\nFolder: `{board['path']}` (leaderboard.parquet, leaderboard.md, plots, card.json)\n"
    if failed:
        text += "\n## Failed evaluations\n\n" + "\n".join(
            f"- run `{f['run']}` at {_steps(f['steps'])}: {f['error']}" for f in failed) + "\n"
    return text


def publish_benchmark_artifacts(board: dict[str, Any], failed: list[dict[str, Any]]) -> None:
    create_table_artifact(key=TABLE_KEY, table=board["rows"],
                          description=f"Leaderboard {board['leaderboard_id']}: {len(board['runs'])} runs, "
                                      f"ranked by {board['main_metric']}")
    create_markdown_artifact(key=REPORT_KEY, markdown=report_markdown(board, failed),
                             description=f"Leaderboard {board['leaderboard_id']}: table, metric per family, "
                                         "metric against NFE")


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
    card = {"settings": settings or {}, "nfe_sweep": list(nfe_sweep or []), "query": {
        "runs": runs, "families": families, "dataset": dataset}, "failed": failed}
    board = TB.leaderboard(summaries, str(root), card)
    publish_benchmark_artifacts(board, failed)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} evaluations failed (the leaderboard "
                           f"{board['path']} has the others): {failed}")
    return {**board, "failed": failed}
