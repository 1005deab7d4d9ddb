"""Benchmark planning: which evaluations a leaderboard needs, validated before any work.

A benchmark evaluates a set of runs with identical settings, each at its default steps and at
every step count of an NFE sweep; the evaluations themselves are ordinary
:func:`imagegen.evaluate.run.evaluate` calls and the leaderboard is
:func:`imagegen.leaderboard.build_leaderboard`.  ``flows/benchmark.py`` runs the plan as Prefect
tasks; :func:`run_plan` runs it in this process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagegen import leaderboard as L
from imagegen.evaluate.request import EvalRequest, EvalSummary
from imagegen.presets import parse_overrides
from imagegen.requests import check_eval_request

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
    is measured against the same images as its teacher.  ``runs`` may also hold diffusers model specs
    (``diffusers:PATH_OR_REPO_ID[@REVISION]``), evaluated like runs with the same settings (which
    then must name the ``reference`` dataset)."""
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
    specs = [r for r in runs or [] if r.startswith("diffusers:")]
    runs = [r for r in runs or [] if not r.startswith("diffusers:")]
    if specs and not runs and not (families or dataset):
        ids: list[str] = []
    elif runs:
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
    for spec in dict.fromkeys(specs):
        base = {**settings, "model": spec}
        req = EvalRequest.model_validate(base)
        jobs.append(req)
        jobs += [EvalRequest.model_validate({**base, "steps": s}) for s in sweep if s != req.steps]
    return jobs


def already_done(req: EvalRequest, summaries: list[EvalSummary]) -> bool:
    """Whether an evaluation of the same run at the same steps is among ``summaries``: a sweep value
    equal to the family's default step count (known once the run's first evaluation resolved it)."""
    spec = req.model
    return req.steps is not None and any(s.get("run_id") == req.run and (s.get("model") or {}).get("spec") == spec
                                         and s.get("steps") == req.steps
                                         and s.get("sampler") == (req.sampler or s.get("sampler"))
                                         for s in summaries)


def check_plan(jobs: list[EvalRequest], root: Path) -> None:
    """The evaluate checks before work, once per run (its jobs differ in steps only)."""
    seen: set[str | None] = set()
    for req in jobs:
        if (req.run or req.model) not in seen:
            seen.add(req.run or req.model)
            check_eval_request(req, root)


def benchmark_card(settings: dict[str, Any] | None, nfe_sweep: list[int] | None, runs: list[str] | None,
                   families: list[str] | None, dataset: str | None, failed: list[dict[str, Any]]) -> dict[str, Any]:
    """What the leaderboard's card records about the benchmark that made it."""
    return {"settings": settings or {}, "nfe_sweep": list(nfe_sweep or []), "failed": failed,
            "query": {"runs": runs, "families": families, "dataset": dataset}}


def run_plan(jobs: list[EvalRequest], root: Path, note: Callable[[str], None] | None = None) -> list[EvalSummary]:
    """Every evaluation of ``jobs`` in this process, one after another (skipping sweep values equal
    to a run's default steps); their summaries."""
    from imagegen.evaluate.run import run_evaluation

    summaries: list[EvalSummary] = []
    for i, req in enumerate(jobs):
        if already_done(req, summaries):
            continue
        if note is not None:
            note(f"[benchmark] {i + 1}/{len(jobs)}: {'run ' + str(req.run) if req.run else req.model} at {req.steps or 'default'} steps")
        summaries.append(run_evaluation(req, root))
    return summaries


# ------------------------------------------------------------------------------------------ the control benchmark


def base_run_of(card: dict[str, Any], root: Path) -> str | None:
    """The run a ControlNet / inpainting / personalised run was built on (its ``model.base``, a
    ``run:<id>`` or that run's checkpoint folder), None when it names none."""
    from imagegen.train.runs import runs_dir

    ref = ((card.get("config") or {}).get("model") or {}).get("base")
    if not isinstance(ref, str) or not ref:
        return None
    if ref.startswith("run:"):
        return ref[4:]
    try:
        rel = Path(ref).resolve().relative_to(runs_dir(Path(root)).resolve())
    except ValueError:
        return None
    return rel.parts[0] if rel.parts else None


def control_plan(root: Path, base: str, controls: list[str] | None = None,
                 settings: dict[str, Any] | None = None) -> list[EvalRequest]:
    """The control benchmark's evaluations, validated: the base run and its controls, each with the
    metric ``control`` (imagegen/evaluate/control.py) and the same ``settings``.

    ``controls``: run ids or prefixes of ControlNet / inpainting runs built on ``base`` (each is checked
    to name it as its ``model.base``); None: every finished run that does."""
    from imagegen.train.runs import get_run, list_runs

    settings = dict(settings or {})
    metrics = list(settings.get("metrics") or ["control"])
    if "control" not in metrics:
        raise ValueError(f"the control benchmark computes the metric 'control'; settings.metrics {metrics} "
                         "leaves it out")
    settings["metrics"] = metrics
    base_ref = get_run(root, base)
    refs = list_runs(root)
    if controls is None:
        ids = [r.id for r in refs if r.card.get("status") == "finished" and base_run_of(r.card, root) == base_ref.id]
    else:
        ids = []
        for c in controls:
            ref = get_run(root, c)
            on = base_run_of(ref.card, root)
            if on != base_ref.id:
                raise ValueError(f"run {ref.id} ({ref.card.get('family')}) is not a control of base run {base_ref.id}: "
                                 + (f"it was built on run {on}" if on else "its config names no base run"))
            ids.append(ref.id)
    return plan(root, runs=[base_ref.id, *dict.fromkeys(ids)], settings=settings)
