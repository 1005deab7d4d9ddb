"""The distill flow: a few-step student from a finished teacher run, and the NFE report, as one Prefect flow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.train import data_uri
from imagegen.distill import DistillRequest, Method, teacher_run
from imagegen.paths import data_root as resolve_root
from imagegen.presets import base_data, deep_merge, parse_overrides
from tasks import distill as T

REPORT_KEY = "distill-report"
SUMMARY_KEY = "distill-summary"


def build_request(request: DistillRequest | None = None, teacher: str | None = None, method: str | None = None,
                  overrides: list[str] | None = None) -> DistillRequest:
    """The validated request: ``request`` (else nothing), then ``overrides`` (``key=value``, the value
    JSON when it parses), then the named ``teacher`` and ``method``, taken as they are."""
    changes = parse_overrides(overrides)
    changes.update({k: v for k, v in {"teacher": teacher, "method": method}.items() if v is not None})
    base = base_data(DistillRequest, {}, None, request)
    if request is not None and not changes:
        return request
    return DistillRequest.model_validate(deep_merge(base, changes))


def check_request(request: DistillRequest, root: Path) -> None:
    """The checks that need no work: the teacher run exists (LookupError), is finished and fits the
    method (RunError).  ``distill`` repeats them; doing them here keeps a bad teacher from
    starting a task (or, from the command line, a flow run)."""
    teacher_run(Path(root), request.teacher, request.method)


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def report_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``distill-report`` table: one row per (model, steps); the first is the reference, the
    teacher at 50 steps, whose MSE is 0 by definition."""
    def run_of(model: str) -> str:  # the report holds the teacher and the last round's student
        return summary["teacher_run"] if model == "teacher" else summary["student_run"]

    return [{"model": r["model"], "run_id": run_of(r["model"]), "steps": int(r["steps"]), "nfe": int(r["nfe"]),
             "mse_to_reference": float(r["mse_to_reference"])} for r in summary["report"]["rows"]]


def distill_markdown(summary: dict[str, Any], request: DistillRequest) -> str:
    rows = summary["report"]["rows"]
    ref = rows[0]
    rounds = summary["rounds"]
    students = "<br>".join(f"`{r['run_id']}` ({r['steps']}-step student{', reused' if r['reused'] else ''}; losses "
                           + (", ".join(f"{k} {v:.4g}" for k, v in (r.get('last_losses') or {}).items()) or "-")
                           + ")" for r in rounds)
    lines = [f"# {summary['method'].capitalize()} distillation: `{summary['teacher_run']}` -> "
             f"`{summary['student_run']}`", "",
             "| | |", "|---|---|",
             f"| method | {summary['method']} |",
             f"| teacher run | `{summary['teacher_run']}` |",
             f"| student run{'s' if len(rounds) > 1 else ''} | {students} |",
             f"| student checkpoint | `{summary['student_checkpoint']}` |",
             f"| training data | `{summary['dataset_id']}` |",
             f"| training per student | {_steps(request.steps)}, lr "
             f"{request.lr if request.lr is not None else 'as the teacher'} |",
             f"| time | {summary['seconds']:.1f} s |",
             "", f"## MSE to the teacher at {_steps(ref['steps'])} (NFE {ref['nfe']})", "",
             "| model | steps | NFE | MSE |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['nfe']} | {r['mse_to_reference']:.5f} |" for r in rows]
    plot = data_uri(summary["report"].get("plot"))
    if plot:
        lines += ["", f"![MSE to the teacher against NFE]({plot})"]
    lines += ["", "## Samples from the same noise", ""]
    for i, r in enumerate(rows):
        uri = data_uri(r.get("grid"))
        title = f"{r['model']}, NFE {r['nfe']} ({_steps(r['steps'])}{', reference' if i == 0 else ''})"
        lines += [f"### {title}", "", f"![{title}]({uri})" if uri else f"(grid missing: `{r.get('grid')}`)", ""]
    return "\n".join(lines)


def publish_distill_artifacts(summary: dict[str, Any], request: DistillRequest) -> None:
    ref = summary["report"]["rows"][0]
    create_table_artifact(key=REPORT_KEY, table=report_rows(summary),
                          description=f"{summary['method']} student {summary['student_run']}: MSE to teacher "
                                      f"{summary['teacher_run']} at {ref['steps']} steps, against NFE")
    create_markdown_artifact(key=SUMMARY_KEY, markdown=distill_markdown(summary, request),
                             description=f"{summary['method']} distillation of {summary['teacher_run']}: runs, "
                                         "NFE plot, sample grids")


@flow(name="distill", log_prints=True)
def distill_flow(request: DistillRequest | None = None, teacher: str | None = None, method: Method | None = None,
                 overrides: list[str] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Distil a finished training run (``teacher``, run id or unique prefix) into a few-step student.

    ``method``: progressive (DDPM v-prediction teacher), reflow (flow teacher) or consistency
    (EDM teacher); both are required, named or inside ``request``.  ``overrides`` such as
    ``["steps=2000", "target_steps=2", "report_nfe=[1,2,4]"]`` set any other field of the
    request.  The same request again reuses the finished student runs.
    """
    logger = get_run_logger()
    req = build_request(request, teacher, method, overrides)  # validated before any work
    root = resolve_root(data_root)
    check_request(req, root)
    summary = T.distill(req, str(root))
    publish_distill_artifacts(summary, req)
    fewest = min((r for r in summary["report"]["rows"][1:] if r["model"] != "teacher"),
               key=lambda r: r["nfe"], default=None)
    logger.info("%s student %s from teacher %s%s", summary["method"], summary["student_run"], summary["teacher_run"],
                f"; at NFE {fewest['nfe']} MSE to the teacher {fewest['mse_to_reference']:.4g}" if fewest else "")
    return summary
