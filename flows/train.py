"""The train flow: train (or resume, or reuse) one model on a registered dataset, as one Prefect flow."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from imagegen.paths import data_root as resolve_root
from imagegen.presets import base_data, deep_merge, parse_overrides
from imagegen.train.runs import TRAIN_PRESETS, TrainRequest
from tasks import train as T

METRICS_KEY = "train-metrics"
SUMMARY_KEY = "train-summary"


def build_request(preset: str | None = "smoke", request: TrainRequest | None = None,
                  overrides: list[str] | None = None, dataset: str | None = None, family: str | None = None,
                  steps: int | None = None, nproc: int | None = None) -> TrainRequest:
    """The validated request: ``request`` (else ``preset``), then ``overrides`` (``a.b=value``), then the
    named parameters.  Named values are taken as they are (a dataset called ``123`` stays a string).

    Overrides merge into the base, so base settings that only fit what an override replaces are
    dropped first: switching ``train.family`` keeps only the model fields the new
    family knows, and switching ``train.model.net`` drops the base's ``net_overrides`` (the smoke
    preset's U-Net levels mean nothing to a DiT); overrides given alongside still apply.
    """
    changes = parse_overrides(overrides)
    named_train = {k: v for k, v in {"family": family, "steps": steps}.items() if v is not None}
    named = {k: v for k, v in {"dataset": dataset, "nproc": nproc, "train": named_train}.items() if v not in (None, {})}
    changes = deep_merge(changes, named)
    base = base_data(TrainRequest, TRAIN_PRESETS, preset, request)
    if request is not None and not changes:
        return request
    return TrainRequest.model_validate(deep_merge(_without_switched(base, changes), changes))


def _without_switched(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    train, new = base.get("train"), changes.get("train")
    if not isinstance(train, dict) or not isinstance(new, dict):
        return base
    train = dict(train)
    model = dict(train.get("model") or {})
    family = new.get("family")
    if isinstance(family, str) and family != train.get("family"):
        from models.registry import get_family

        try:
            known = get_family(family).Config.model_fields
        except ValueError:
            pass  # an unknown family: validation names it
        else:
            model = {k: v for k, v in model.items() if k in known}
    net = (new.get("model") or {}).get("net") if isinstance(new.get("model"), dict) else None
    if isinstance(net, str) and "net" in model and net != model["net"]:
        model.pop("net_overrides", None)
    train["model"] = model
    return {**base, "train": train}


def data_uri(png: str | Path | None) -> str | None:
    if not png or not Path(png).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode()


def metrics_row(summary: dict[str, Any], request: TrainRequest) -> dict[str, Any]:
    """The ``train-metrics`` table: one row (final losses as ``loss/<optimizer>`` columns)."""
    row: dict[str, Any] = {"run_id": summary["run_id"], "dataset_id": summary["dataset_id"],
                           "family": summary.get("family"), "step": summary.get("step"),
                           "steps": request.train.steps, "finished": summary.get("finished"),
                           "steps_per_s": summary.get("steps_per_s"), "reused": summary.get("reused")}
    row.update({f"loss/{k}": v for k, v in (summary.get("last_losses") or {}).items()})
    return row


def train_markdown(summary: dict[str, Any], request: TrainRequest) -> str:
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
             f"| optimizer | AdamW lr {cfg.lr:g}, warmup {cfg.warmup_steps}, {cfg.schedule}, EMA {cfg.ema_decay:g} |",
             f"| precision / device | {summary.get('precision', cfg.precision)} / {summary.get('device', cfg.device)} |",
             f"| final losses | {losses} |",
             f"| speed | {f'{rate:.3g} steps/s' if rate else '-'} |",
             "", "<details><summary>full training config</summary>", "", "```json",
             json.dumps(cfg.model_dump(mode="json"), indent=1), "```", "", "</details>"]
    curve = data_uri(summary.get("loss_curve"))
    if curve:
        lines += ["", "## Loss curve", "", f"![loss curve]({curve})"]
    samples = summary.get("samples") or []
    grid = data_uri(samples[-1]) if samples else None
    if grid:
        lines += ["", f"## Samples ({Path(samples[-1]).stem})", "", f"![samples]({grid})"]
    return "\n".join(lines)


def publish_train_artifacts(summary: dict[str, Any], request: TrainRequest) -> None:
    create_table_artifact(key=METRICS_KEY, table=[metrics_row(summary, request)],
                          description=f"Final metrics of training run {summary['run_id']}")
    create_markdown_artifact(key=SUMMARY_KEY, markdown=train_markdown(summary, request),
                             description=f"Training run {summary['run_id']}: config, loss curve, samples")


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
    req = build_request(preset, request, overrides, dataset, family, steps, nproc)  # validated before any work
    root = resolve_root(data_root)
    summary = T.train.with_options(timeout_seconds=T.timeout_seconds(req))(req, str(root))
    publish_train_artifacts(summary, req)
    logger.info("run %s on dataset %s: step %s, losses %s (%s)", summary["run_id"], summary["dataset_id"],
                summary.get("step"), summary.get("last_losses"), summary["run_dir"])
    return summary
