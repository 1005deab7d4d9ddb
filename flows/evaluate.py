"""The evaluate flow: FID/FD + KID, CLIPScore and GenEval of one run or image folder, as one Prefect flow."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from imagegen.evaluate.images import image_grid
from imagegen.evaluate.run import EvalRequest
from imagegen.paths import data_root as resolve_root
from imagegen.presets import base_data, deep_merge, parse_overrides
from tasks import evaluate as T

METRICS_KEY = "evaluate-metrics"
SUMMARY_KEY = "evaluate-summary"
GRID_IMAGES = 16


def build_request(request: EvalRequest | None = None, run: str | None = None, folder: str | None = None,
                  overrides: list[str] | None = None) -> EvalRequest:
    """The validated request: ``request`` (else nothing), then ``overrides`` (``key=value``, the value
    JSON when it parses: ``metrics=["fid","kid"]``, ``steps=8``), then the named ``run`` / ``folder``,
    taken as they are (a run id ``123`` stays a string)."""
    changes = parse_overrides(overrides)
    changes.update({k: v for k, v in {"run": run, "folder": folder}.items() if v is not None})
    base = base_data(EvalRequest, {}, None, request)
    if request is not None and not changes:
        return request
    return EvalRequest.model_validate(deep_merge(base, changes))


def check_request(request: EvalRequest, root: Path) -> None:
    """The checks that need no work (``evaluate`` repeats them): the run is in the registry
    (LookupError) and has a checkpoint, the folder holds readable images of one size, the reference
    dataset exists, the sampler fits the family, guidance has a condition, the Inception weights
    are there for FID, a GenEval prompt file parses (its line number in the error).  Doing them here
    keeps bad input from starting a task (or, from the command line, a flow run)."""
    from imagegen.evaluate.run import check_request as check

    check(request, Path(root))


# ------------------------------------------------------------------------------------------ artifacts


def _per_metric(summary: dict[str, Any], column: str) -> dict[str, Any]:
    """``column`` of metrics.parquet by metric name (empty when the file or column is absent)."""
    path = summary.get("metrics_file")
    if not path or not Path(path).is_file():
        return {}
    df = pd.read_parquet(path)
    if column not in df.columns:
        return {}
    return {m: (None if pd.isna(v) else v) for m, v in zip(df["metric"], df[column])}


def metrics_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``evaluate-metrics`` table: one row per metric with the sampling settings it was computed under;
    ``n`` is the number of images behind the value (the generated set, or GenEval's images)."""
    n_by_metric = _per_metric(summary, "n_generated")
    return [{"metric": name, "value": float(value), "run": summary.get("run_id"), "family": summary.get("family"),
             "sampler": summary.get("sampler"), "steps": summary.get("steps"), "NFE": summary.get("nfe"),
             "guidance": summary.get("guidance"),
             "n": int(n_by_metric[name]) if n_by_metric.get(name) is not None else summary.get("n_samples")}
            for name, value in summary["metrics"].items()]


def shown_images(summary: dict[str, Any], request: EvalRequest, count: int = GRID_IMAGES) -> list[Path]:
    """The first ``count`` evaluated images: ``<eval>/samples/`` for a run, the folder's own otherwise
    (a GenEval layout: the first images of its ``NNNNN/samples/``)."""
    samples = Path(summary["path"]) / "samples"
    if samples.is_dir():
        return sorted(samples.glob("*.png"))[:count]
    if request.folder is None:
        return []
    folder = Path(str(request.folder))
    top = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
                 and not p.name.startswith("."))
    return (top or sorted(folder.glob("*/samples/*.png")))[:count]


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else ("-" if value is None else str(value))


def evaluate_markdown(summary: dict[str, Any], request: EvalRequest) -> str:
    if summary.get("run_id"):
        title = f"# Evaluation of run `{summary['run_id']}` ({summary.get('family')})"
        source = f"run `{summary['run_id']}`, family {summary.get('family')}"
        sampling = (f"{summary.get('sampler')}, {summary.get('steps')} steps (NFE {_fmt(summary.get('nfe'))}), "
                    f"guidance {request.guidance:g}, seed {request.seed}")
    else:
        title = f"# Evaluation of folder `{request.folder}`"
        source = f"folder `{request.folder}`"
        sampling = "- (images evaluated as they are)"
    lines = [title, "", f"Evaluation `{summary['eval_id']}`: `{summary['path']}`", "",
             "| | |", "|---|---|",
             f"| source | {source} |",
             f"| sampling | {sampling} |",
             f"| images | {summary.get('n_samples')} (FID/KID/CLIPScore) |",
             f"| reference | {request.reference or 'the run dataset'} |",
             f"| extractor / CLIP | {request.extractor} / {request.clip_model} |",
             f"| time | {summary.get('seconds', 0):.1f} s |",
             "", "## Metrics", "", "| metric | value | n | implementation |", "|---|---:|---:|---|"]
    impl = _per_metric(summary, "implementation")
    for row in metrics_rows(summary):
        lines.append(f"| {row['metric']} | {row['value']:.6g} | {row['n']} | {impl.get(row['metric']) or '-'} |")
    if not summary["metrics"]:
        lines.append("| (none) | | | |")
    if summary["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- **{m}**: {why}" for m, why in summary["skipped"].items()]
    if summary.get("metrics_file"):
        lines += ["", f"Every row with its provenance: `{summary['metrics_file']}`"]
    files = shown_images(summary, request)
    if files:
        lines += ["", f"## The first {len(files)} evaluated images", "",
                  f"![evaluated images]({png_uri(image_grid(files))})"]
    lines += ["", "<details><summary>request</summary>", "", "```json",
              json.dumps(request.model_dump(mode="json"), indent=1), "```", "", "</details>"]
    return "\n".join(lines)


def publish_evaluate_artifacts(summary: dict[str, Any], request: EvalRequest) -> None:
    what = f"run {summary['run_id']}" if summary.get("run_id") else f"folder {request.folder}"
    create_table_artifact(key=METRICS_KEY, table=metrics_rows(summary),
                          description=f"Metrics of {what} (evaluation {summary['eval_id']})")
    create_markdown_artifact(key=SUMMARY_KEY, markdown=evaluate_markdown(summary, request),
                             description=f"Evaluation {summary['eval_id']} of {what}: metrics, skipped "
                                         "metrics, evaluated images")


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
    req = build_request(request, run, folder, overrides)  # validated before any work
    root = resolve_root(data_root)
    check_request(req, root)
    summary = T.evaluate(req, str(root))
    publish_evaluate_artifacts(summary, req)
    logger.info("evaluation %s: %s%s", summary["eval_id"], "; ".join(T.metric_lines(summary)) or "no metrics",
                "".join(f"; skipped {m} ({why})" for m, why in summary["skipped"].items()))
    return summary
