"""Reports and Prefect artifact pages, as plain functions (no Prefect here).

* the shared formatting: :func:`png_data_uri` (a PNG as a ``data:`` URI), :func:`fmt`,
  :func:`steps_text`, the trainer's :func:`progress_line`, an evaluation's :func:`metric_lines`;
* the artifact pages each flow publishes (:class:`Page`: a table or a markdown page under a
  stable key): :func:`curate_pages`, :func:`train_pages`, :func:`distill_pages`,
  :func:`evaluate_pages`, :func:`benchmark_pages`, :func:`sample_pages`, :func:`pipeline_pages`.  ``flows/publish.py``
  turns pages into Prefect artifacts; nothing else in the library knows about Prefect;
* the pipeline report (``write_report``): ``<data root>/reports/<id>/`` where the id hashes the
  stage ids (dataset, runs, evaluations): ``report.md`` (images by relative path),
  ``report.html`` (images embedded), ``images/`` and ``card.json`` (the pipeline summary).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imagegen.artifacts import stage_output
from imagegen.evaluate.images import image_grid
from imagegen.hashing import stable_hash

if TYPE_CHECKING:
    from imagegen.evaluate.request import EvalSummary

REPORTS = "reports"
GRID_IMAGES = 16  # evaluated images shown per model


# ------------------------------------------------------------------------------------------ formatting


def png_data_uri(src: bytes | str | Path | None) -> str | None:
    """A PNG (its bytes, or a file) as a ``data:image/png;base64,...`` URI; None for no file."""
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif not src or not Path(src).is_file():
        return None
    else:
        data = Path(src).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def fmt(value: Any, spec: str = ".4g") -> str:
    """A table cell: ``-`` for None, yes/no for a bool, floats to ``spec``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def steps_text(n: int | None, none: str = "its default steps") -> str:
    """``1 step``, ``4 steps``; ``none`` for None."""
    return none if n is None else f"{n} step{'' if n == 1 else 's'}"


def progress_line(info: dict[str, Any]) -> str:
    """One log line from a trainer progress dict."""
    losses = " ".join(f"{k}={v:.4g}" for k, v in (info.get("losses") or {}).items())
    rate, eta = info.get("steps_per_s"), info.get("eta_s")
    text = f"step {info['step']}/{info['steps']} ({100.0 * info['fraction']:.0f}%) {losses}"
    if rate:
        text += f", {rate:.2f} steps/s"
    if eta is not None and math.isfinite(eta):
        text += f", eta {eta:.0f} s"
    return text


def metric_lines(summary: "EvalSummary") -> list[str]:
    """``name: value`` for every metric of an evaluation summary (what ``imagegen evaluate`` prints)."""
    return [f"{name}: {value:.6g}" if isinstance(value, (int, float)) else f"{name}: {value}"
            for name, value in summary["metrics"].items()]


# ------------------------------------------------------------------------------------------ pages


@dataclass(frozen=True)
class Page:
    """One artifact a flow publishes: a table (a list of row dicts) or a markdown page, under a
    stable ``key`` (every run adds a version under it)."""

    key: str
    kind: Literal["table", "markdown"]
    content: Any
    description: str


# curate ----------------------------------------------------------------------------------------


def curate_summary(dataset_path: Path) -> dict[str, Any]:
    """What the curate flow and ``imagegen curate`` return: ids, counts, accounting, paths."""
    card = json.loads((dataset_path / "card.json").read_text())
    counts = card["counts"]
    return {"dataset_id": card["id"], "name": card.get("name"), "path": str(dataset_path),
            "samples": counts["shard"]["samples"], "shards": counts["shard"]["shards"],
            "input_rows": counts["download"]["input_rows"], "accounting": counts["accounting"],
            "stage_ids": card["stage_ids"]}


def stage_count_rows(card: dict[str, Any]) -> list[dict[str, Any]]:
    """Counts per stage: rows in, kept, dropped by reason."""
    c = card["counts"]
    dl, ff = c["download"], c["filter"]
    rows = [{"stage": "download", "in": dl["input_rows"], "kept": dl["success"],
             "dropped": json.dumps(dl["reasons"])}]
    dup = {k: v for k, v in ff["dropped"].items() if k.endswith("_duplicate")}
    flt = {k: v for k, v in ff["dropped"].items() if not k.endswith("_duplicate")}
    rows.append({"stage": "dedup", "in": ff["images"], "kept": ff["images"] - sum(dup.values()),
                 "dropped": json.dumps(dup)})
    rows.append({"stage": "filter", "in": ff["images"] - sum(dup.values()), "kept": ff["kept"],
                 "dropped": json.dumps(flt)})
    rc = c["recaption"]
    rows.append({"stage": "recaption", "in": ff["kept"], "kept": ff["kept"], "dropped": json.dumps({}),
                 "note": json.dumps({k: v for k, v in rc.items() if not isinstance(v, (dict, list))})})
    rows.append({"stage": "shard", "in": ff["kept"], "kept": c["shard"]["samples"], "dropped": json.dumps({}),
                 "note": f"{c['shard']['shards']} shards, {c['shard']['bytes']} bytes"})
    return rows


def curate_markdown(card: dict[str, Any], dataset_path: Path) -> str:
    rows = stage_count_rows(card)
    lines = [f"# Dataset `{card.get('name')}` ({card['id']})", "", f"Path: `{dataset_path}`", "",
             "| stage | in | kept | dropped |", "|---|---:|---:|---|"]
    lines += [f"| {r['stage']} | {r['in']} | {r['kept']} | {r['dropped']} |" for r in rows]
    wr = card.get("world_report")
    if wr and "caption_accuracy_final" in wr:
        lines += ["", "Caption accuracy against the world's ground truth (kept rows): "
                  f"alt text {json.dumps(wr['caption_accuracy_alt_text'])}, "
                  f"after recaptioning {json.dumps(wr['caption_accuracy_final'])}"]
    if card.get("reference_clip"):
        lines += ["", f"Reference CLIP: {json.dumps(card['reference_clip'])}"]
    grid = png_data_uri(dataset_path / "samples.png")
    if grid:
        lines += ["", "## Samples and their captions", "", f"![samples]({grid})"]
    return "\n".join(lines)


def curate_pages(dataset_path: Path | str) -> list[Page]:
    path = Path(dataset_path)
    card = json.loads((path / "card.json").read_text())
    return [Page("curate-stage-counts", "table", stage_count_rows(card), f"Counts per stage for dataset {card['id']}"),
            Page("curate-summary", "markdown", curate_markdown(card, path), f"Dataset card summary for {card['id']}")]


# train -----------------------------------------------------------------------------------------


def train_metrics_row(summary: dict[str, Any], request: Any) -> dict[str, Any]:
    """The ``train-metrics`` table: one row (final losses as ``loss/<optimizer>`` columns)."""
    row: dict[str, Any] = {"run_id": summary["run_id"], "dataset_id": summary["dataset_id"],
                           "family": summary.get("family"), "step": summary.get("step"),
                           "steps": request.train.steps, "finished": summary.get("finished"),
                           "steps_per_s": summary.get("steps_per_s"), "reused": summary.get("reused")}
    row.update({f"loss/{k}": v for k, v in (summary.get("last_losses") or {}).items()})
    return row


def train_markdown(summary: dict[str, Any], request: Any) -> str:
    cfg = request.train
    model = cfg.model
    rate = summary.get("steps_per_s")
    losses = ", ".join(f"{k} {v:.4g}" for k, v in (summary.get("last_losses") or {}).items()) or "-"
    lines = [f"# Training run `{summary['run_id']}`", "",
             f"Run folder: `{summary['run_dir']}`{' (reused: already finished)' if summary.get('reused') else ''}", "",
             "| | |", "|---|---|",
             f"| dataset | {summary.get('dataset_name') or '-'} (`{summary['dataset_id']}`) |",
             f"| family | {cfg.family} |",
             f"| model | {model.get('net')} {model.get('net_size')}, {model.get('image_size')} px, "
             f"conditioning {model.get('conditioning')} |",
             f"| steps | {summary.get('step')} / {cfg.steps} |",
             f"| batch | {cfg.batch_size} ({cfg.micro_batches} micro-batches, {request.nproc} processes) |",
             f"| optimizer | AdamW lr {cfg.lr:g}, warmup {cfg.warmup_steps}, {cfg.schedule}, EMA {cfg.ema_decay:g}{' with warm-up' if cfg.ema_decay and cfg.ema_warmup else ''} |",
             f"| precision / device | {summary.get('precision', cfg.precision)} / {summary.get('device', cfg.device)} |",
             f"| final losses | {losses} |",
             f"| speed | {f'{rate:.3g} steps/s' if rate else '-'} |",
             "", "<details><summary>full training config</summary>", "", "```json",
             json.dumps(cfg.model_dump(mode="json"), indent=1), "```", "", "</details>"]
    curve = png_data_uri(summary.get("loss_curve"))
    if curve:
        lines += ["", "## Loss curve", "", f"![loss curve]({curve})"]
    samples = summary.get("samples") or []
    grid = png_data_uri(samples[-1]) if samples else None
    if grid:
        lines += ["", f"## Samples ({Path(samples[-1]).stem})", "", f"![samples]({grid})"]
    return "\n".join(lines)


def train_pages(summary: dict[str, Any], request: Any) -> list[Page]:
    return [Page("train-metrics", "table", [train_metrics_row(summary, request)],
                 f"Final metrics of training run {summary['run_id']}"),
            Page("train-summary", "markdown", train_markdown(summary, request),
                 f"Training run {summary['run_id']}: config, loss curve, samples")]


# distill ---------------------------------------------------------------------------------------


def distill_report_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``distill-report`` table: one row per (model, steps); the first is the reference, the
    teacher at 50 steps, whose MSE is 0 by definition."""
    def run_of(model: str) -> str:  # the report holds the teacher and the last round's student
        return summary["teacher_run"] if model == "teacher" else summary["student_run"]

    return [{"model": r["model"], "run_id": run_of(r["model"]), "steps": int(r["steps"]), "nfe": int(r["nfe"]),
             "mse_to_reference": float(r["mse_to_reference"]), "teacher_calls": int(r.get("teacher_calls", 0)),
             "train_steps": int(r.get("student_steps", 0)), "train_seconds": float(r.get("train_seconds", 0.0))}
            for r in summary["report"]["rows"]]


def distill_markdown(summary: dict[str, Any], request: Any) -> str:
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
             f"| training per student | {steps_text(request.steps)}, lr "
             f"{request.lr if request.lr is not None else 'as the teacher'} |",
             f"| time | {summary['seconds']:.1f} s |",
             "", f"## MSE to the teacher at {steps_text(ref['steps'])} (NFE {ref['nfe']})", "",
             "| model | steps | NFE | MSE | teacher calls | train steps | train s |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['nfe']} | {r['mse_to_reference']:.5f} | "
              f"{int(r.get('teacher_calls', 0)):,} | {int(r.get('student_steps', 0)):,} | "
              f"{float(r.get('train_seconds', 0.0)):.1f} |" for r in rows]
    plot = png_data_uri(summary["report"].get("plot"))
    if plot:
        lines += ["", f"![MSE to the teacher against NFE]({plot})"]
    lines += ["", "## Samples from the same noise", ""]
    for i, r in enumerate(rows):
        uri = png_data_uri(r.get("grid"))
        title = f"{r['model']}, NFE {r['nfe']} ({steps_text(r['steps'])}{', reference' if i == 0 else ''})"
        lines += [f"### {title}", "", f"![{title}]({uri})" if uri else f"(grid missing: `{r.get('grid')}`)", ""]
    return "\n".join(lines)


def distill_pages(summary: dict[str, Any], request: Any) -> list[Page]:
    ref = summary["report"]["rows"][0]
    return [Page("distill-report", "table", distill_report_rows(summary),
                 f"{summary['method']} student {summary['student_run']}: MSE to teacher "
                 f"{summary['teacher_run']} at {ref['steps']} steps, against NFE"),
            Page("distill-summary", "markdown", distill_markdown(summary, request),
                 f"{summary['method']} distillation of {summary['teacher_run']}: runs, NFE plot, sample grids")]


# evaluate --------------------------------------------------------------------------------------


def _per_metric(summary: dict[str, Any], column: str) -> dict[str, Any]:
    """``column`` of metrics.parquet by metric name (empty when the file or column is absent)."""
    import pandas as pd

    path = summary.get("metrics_file")
    if not path or not Path(path).is_file():
        return {}
    df = pd.read_parquet(path)
    if column not in df.columns:
        return {}
    return {m: (None if pd.isna(v) else v) for m, v in zip(df["metric"], df[column])}


def eval_metrics_rows(summary: "EvalSummary") -> list[dict[str, Any]]:
    """The ``evaluate-metrics`` table: one row per metric with the sampling settings it was computed under;
    ``n`` is the number of images behind the value (the generated set, or GenEval's images); the
    interval (``ci_low``, ``ci_high``) and the sample-count flags of the row."""
    n_by_metric = _per_metric(summary, "n_generated")
    return [{"metric": name, "value": float(value), "run": summary.get("run_id"), "family": summary.get("family"),
             "sampler": summary.get("sampler"), "steps": summary.get("steps"), "NFE": summary.get("nfe"),
             "guidance": summary.get("guidance"),
             "n": int(n_by_metric[name]) if n_by_metric.get(name) is not None else summary.get("n_samples"),
             "ci_low": (summary.get("intervals") or {}).get(name, [None, None])[0],
             "ci_high": (summary.get("intervals") or {}).get(name, [None, None])[1],
             "flags": "; ".join((summary.get("flags") or {}).get(name, []))}
            for name, value in summary["metrics"].items()]


def shown_images(summary: "EvalSummary", request: Any, count: int = GRID_IMAGES) -> list[Path]:
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


def evaluate_markdown(summary: "EvalSummary", request: Any) -> str:
    if summary.get("run_id"):
        title = f"# Evaluation of run `{summary['run_id']}` ({summary.get('family')})"
        source = f"run `{summary['run_id']}`, family {summary.get('family')}"
        sampling = (f"{summary.get('sampler')}, {summary.get('steps')} steps (NFE {fmt(summary.get('nfe'), '.6g')}), "
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
    for row in eval_metrics_rows(summary):
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
                  f"![evaluated images]({png_data_uri(image_grid(files))})"]
    lines += ["", "<details><summary>request</summary>", "", "```json",
              json.dumps(request.model_dump(mode="json"), indent=1), "```", "", "</details>"]
    return "\n".join(lines)


def evaluate_pages(summary: "EvalSummary", request: Any) -> list[Page]:
    what = f"run {summary['run_id']}" if summary.get("run_id") else f"folder {request.folder}"
    return [Page("evaluate-metrics", "table", eval_metrics_rows(summary),
                 f"Metrics of {what} (evaluation {summary['eval_id']})"),
            Page("evaluate-summary", "markdown", evaluate_markdown(summary, request),
                 f"Evaluation {summary['eval_id']} of {what}: metrics, skipped metrics, evaluated images")]


# benchmark -------------------------------------------------------------------------------------


def benchmark_markdown(board: dict[str, Any], failed: list[dict[str, Any]]) -> str:
    import pandas as pd

    from imagegen.leaderboard import leaderboard_markdown

    df = pd.DataFrame(board["rows"])
    images = {k: uri for k in ("family_plot", "nfe_plot") if (uri := png_data_uri(board["files"][k]))}
    text = leaderboard_markdown(df, images, title=f"Leaderboard `{board['leaderboard_id']}`",
                                protocol=board.get("protocol"))
    text += f"\nFolder: `{board['path']}` (leaderboard.parquet, leaderboard.md, plots, card.json)\n"
    if failed:
        text += "\n## Failed evaluations\n\n" + "\n".join(
            f"- run `{f['run']}` at {steps_text(f['steps'])}: {f['error']}" for f in failed) + "\n"
    return text


def benchmark_pages(board: dict[str, Any], failed: list[dict[str, Any]]) -> list[Page]:
    # stable keys: every benchmark run adds a version under the same key in Prefect
    return [Page("leaderboard", "table", board["rows"],
                 f"Leaderboard {board['leaderboard_id']}: {len(board['runs'])} runs, ranked by {board['main_metric']}"),
            Page("leaderboard-report", "markdown", benchmark_markdown(board, failed),
                 f"Leaderboard {board['leaderboard_id']}: table, metric per family, metric against NFE")]


# sample ----------------------------------------------------------------------------------------


def sample_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Samples of run `{summary['run_id']}` ({summary['family']})", "",
             f"{summary['n_images']} image(s) in `{summary['out']}`: {summary['sampler']}, {summary['steps']} steps, "
             f"guidance {summary['guidance']:g}" + (f", watermark {summary['watermark']!r}" if summary["watermark"] else "")
             + (f", edit: {summary['edit']}" if summary.get("edit", "sample") != "sample" else ""),
             "", "Prompts: " + "; ".join(f"`{p}`" for p in summary["prompts"] if p) or "(unconditional)"]
    grid = png_data_uri(summary.get("grid"))
    if grid:
        lines += ["", f"![grid]({grid})"]
    return "\n".join(lines)


def sample_pages(summary: dict[str, Any]) -> list[Page]:
    return [Page("sample-grid", "markdown", sample_markdown(summary),
                 f"Samples {summary['sample_id']} of "
                 + (f"run {summary['run_id']}" if summary.get("run_id") else str(summary.get("model"))))]


# pipeline --------------------------------------------------------------------------------------


def pipeline_pages(summary: dict[str, Any]) -> list[Page]:
    return [Page("pipeline-report", "markdown", embedded_markdown(summary["report"]["markdown"]),
                 f"Pipeline report {summary['report']['id']}: dataset card, training curve, teacher and student "
                 "samples, metrics")]


# ------------------------------------------------------------------------------------------ pipeline report


def report_id(summary: dict[str, Any]) -> str:
    """Hash of the stage ids: the dataset, the runs, the evaluations."""
    return stable_hash({"dataset": summary["dataset"]["id"], "teacher": summary["teacher"]["run_id"],
                        "student": (summary["distill"] or {}).get("student_run"),
                        "evals": {r: e["eval_id"] for r, e in summary["evaluations"].items()}})


def report_dir(root: Path | str, summary: dict[str, Any]) -> Path:
    return Path(root) / REPORTS / (summary.get("report_id") or report_id(summary))


def metrics_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the metrics table: one row per metric (and the sampling settings), one
    column per evaluated model; a skipped metric says so."""
    evals = summary["evaluations"]
    roles = list(evals)
    names: list[str] = []
    for e in evals.values():
        names += [m for m in e["metrics"] if m not in names]
    skipped: list[str] = []
    for e in evals.values():
        skipped += [m for m in e["skipped"] if m not in skipped]
    rows = [["run"] + [f"`{evals[r]['run_id']}` ({evals[r]['family']})" for r in roles],
            ["sampler, steps"] + [f"{evals[r]['sampler']}, {evals[r]['steps']}" for r in roles],
            ["NFE"] + [fmt(evals[r]["nfe"]) for r in roles],
            ["guidance"] + [fmt(evals[r]["guidance"]) for r in roles],
            ["images"] + [fmt(evals[r]["n_samples"]) for r in roles]]
    rows += [[m] + [fmt(evals[r]["metrics"].get(m)) for r in roles] for m in names]
    rows += [[m] + ["skipped" if m in evals[r]["skipped"] else "-" for r in roles] for m in skipped]
    return ["metric"] + roles, rows


def _blocks(summary: dict[str, Any], out: Path) -> list[tuple]:
    """The report as blocks (heading, paragraph, table, image, list); images are written to
    ``out/images/`` and referenced by their path relative to ``out``."""
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    def image(src: str | Path | None, name: str, alt: str) -> list[tuple]:
        if not src or not Path(src).is_file():
            return []
        dst = img_dir / name
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return [("img", f"images/{name}", alt)]

    ds, tr, di, ev = summary["dataset"], summary["teacher"], summary["distill"], summary["evaluations"]
    req = summary["request"]
    b: list[tuple] = [("h", 1, f"Pipeline report `{summary['report_id']}`"),
                      ("p", f"Data root `{summary['data_root']}`. Curate preset {req['curate']['preset']}, "
                            f"train preset {req['train']['preset']}, distillation "
                            f"{req['distill']['method'] or 'skipped'}.")]
    def secs(stage: str) -> list[str]:
        return [fmt(summary["seconds"].get(stage)), fmt(summary.get("cpu_seconds", {}).get(stage))]

    stage_rows = [["curate", f"dataset `{ds['id']}`", *secs("curate")],
                  ["train", f"run `{tr['run_id']}`{' (reused)' if tr.get('reused') else ''}", *secs("train")]]
    if di:
        reused = all(r.get("reused") for r in di["rounds"])
        stage_rows.append(["distill", f"run `{di['student_run']}`{' (reused)' if reused else ''}", *secs("distill")])
    stage_rows += [[f"evaluate {role}", f"evaluation `{e['eval_id']}`", *secs(f"evaluate_{role}")]
                   for role, e in ev.items()]
    b += [("h", 2, "Stages"), ("table", ["stage", "output", "wall s", "CPU s"], stage_rows)]

    b += [("h", 2, f"Dataset `{ds['name']}` (`{ds['id']}`)"),
          ("table", ["", ""], [["samples", fmt(ds["samples"])], ["shards", fmt(ds["shards"])],
                               ["input rows", fmt(ds["input_rows"])], ["path", f"`{ds['path']}`"]])]
    if ds["accounting"]:
        b += [("p", "Every input row's outcome (they add up to the input rows):"),
              ("table", ["outcome", "rows"], [[k, str(v)] for k, v in sorted(ds["accounting"].items())])]
    acc = ds.get("caption_accuracy") or {}
    if acc:
        keys = sorted({k for v in acc.values() for k in v if isinstance(v.get(k), (int, float))})
        b += [("p", "Caption accuracy against the world's ground truth (kept rows):"),
              ("table", ["captions"] + keys, [[label] + [fmt(v.get(k)) for k in keys] for label, v in acc.items()])]
    clip = (ds.get("reference_clip") or {}).get("retrieval") or {}
    if "top1_distinct" in clip:
        b += [("p", f"Reference CLIP `{ds['stage_ids'].get('reference_clip')}` (the extractor of FD-CLIP and the "
                    f"model of CLIPScore): held-out image->caption top-1 {clip['top1_distinct']:.3f} among "
                    f"{clip.get('n_distinct_captions')} distinct captions (chance "
                    f"{clip.get('top1_distinct_chance', 0):.3f}).")]
    b += image(ds.get("grid"), "dataset_samples.png", "dataset samples and captions")

    losses = ", ".join(f"{k} {fmt(v)}" for k, v in (tr["last_losses"] or {}).items()) or "-"
    b += [("h", 2, f"Teacher: training run `{tr['run_id']}` ({tr['family']})"),
          ("table", ["", ""], [["steps", fmt(tr["step"])], ["final losses", losses],
                               ["speed", f"{fmt(tr.get('steps_per_s'))} steps/s"], ["folder", f"`{tr['run_dir']}`"]])]
    curve = image(tr.get("loss_curve"), "loss_curve.png", "training loss curve")
    if curve:
        b += [("h", 3, "Training loss"), *curve]
    samples = tr.get("samples") or []
    grid = image(samples[-1] if samples else None, "teacher_train_samples.png",
                 "teacher samples at the end of training")
    if grid:
        b += [("h", 3, "Teacher samples at the end of training"), *grid]

    if di:
        rows = di["report"]["rows"]
        ref = rows[0]
        b += [("h", 2, f"Distillation: {di['method']} student `{di['student_run']}`"),
              ("p", f"Teacher and student sampled from the same noise; MSE to the teacher at {ref['steps']} steps "
                    f"(NFE {ref['nfe']}). Student trained on `{di['dataset_id']}`."),
              ("table", ["model", "steps", "NFE", "MSE to the reference"],
               [[r["model"], str(r["steps"]), str(r["nfe"]), f"{float(r['mse_to_reference']):.3g}"] for r in rows])]
        b += image(di["report"].get("plot"), "nfe_mse.png", "MSE to the teacher against NFE")
        b += [("h", 3, "Sample grids (same noise, same conditions)")]
        for i, r in enumerate(rows):
            title = (f"{r['model']}, NFE {r['nfe']} ({r['steps']} step{'' if r['steps'] == 1 else 's'}"
                     f"{', reference' if i == 0 else ''})")
            b += [("p", title), *image(r.get("grid"), f"distill_{r['model']}_steps{r['steps']}.png", title)]

    header, rows = metrics_table(summary)
    b += [("h", 2, "Metrics"), ("table", header, rows)]
    refs = {role: e.get("reference") for role, e in ev.items()}
    b += [("p", "FID/FD and KID against " + "; ".join(f"{role}: `{ref or ds['id']}`" for role, ref in refs.items())
          + ". Evaluation folders: " + "; ".join(f"{role} `{e['path']}`" for role, e in ev.items()) + ".")]
    reasons = [f"{role}: {m} skipped ({why})" for role, e in ev.items() for m, why in e["skipped"].items()]
    if reasons:
        b += [("list", reasons)]
    for role, e in ev.items():
        files = sorted((Path(e["path"]) / "samples").glob("*.png"))[:GRID_IMAGES]
        if files:
            img_dir.mkdir(parents=True, exist_ok=True)
            (img_dir / f"evaluated_{role}.png").write_bytes(image_grid(files))
            b += [("h", 3, f"The first {len(files)} evaluated images of the {role}"),
                  ("img", f"images/evaluated_{role}.png", f"evaluated images of the {role}")]
    return b


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_md(blocks: list[tuple]) -> str:
    out: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out += ["#" * blk[1] + " " + blk[2], ""]
        elif kind == "p":
            out += [blk[1], ""]
        elif kind == "table":
            header, rows = blk[1], blk[2]
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "img":
            out += [f"![{blk[2]}]({blk[1]})", ""]
        elif kind == "list":
            out += [f"- {item}" for item in blk[1]] + [""]
    return "\n".join(out)


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text), quote=False))


def _render_html(blocks: list[tuple], base: Path, title: str) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;"
           "text-align:left}img{image-rendering:pixelated;max-width:100%}code{background:#f4f4f4}</style>",
           "</head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append(f"<h{blk[1]}>{_inline_html(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(blk[1])}</p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in blk[1]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in blk[2]]
            out.append("</table>")
        elif kind == "img":
            out.append(f"<p><img alt=\"{html.escape(blk[2])}\" src=\"{png_data_uri(base / blk[1])}\"></p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in blk[1]) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(summary: dict[str, Any], out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``report.md`` (images by relative path under ``images/``), ``report.html`` (images
    embedded) and ``card.json`` (the summary) into ``out_dir``, atomically; returns (md, html)."""
    out_dir = Path(out_dir)
    with stage_output(out_dir) as (tmp, card):
        blocks = _blocks(summary, tmp)
        (tmp / "report.md").write_text(_render_md(blocks))
        (tmp / "report.html").write_text(_render_html(blocks, tmp, f"Pipeline report {summary.get('report_id')}"))
        card.update(kind="pipeline_report", id=summary.get("report_id"), summary=summary)
    return out_dir / "report.md", out_dir / "report.html"


def embedded_markdown(md_path: Path | str) -> str:
    """``report.md`` with every ``images/...png`` reference replaced by the image as a data URI
    (for a Prefect markdown artifact, which cannot reach files)."""
    md_path = Path(md_path)
    return re.sub(r"\]\((images/[^)]+\.png)\)", lambda m: f"]({png_data_uri(md_path.parent / m.group(1))})",
                  md_path.read_text())
