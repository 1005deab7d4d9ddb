"""The end-to-end pipeline as plain functions: its request and presets, the stage order.

curate -> train -> distill -> evaluate (teacher and student).  Every stage is content-addressed
by its own module (curate stage folders, run folders, reflow pair datasets, eval folders), so
running the pipeline again recomputes only what changed: another train family reuses the curated
shards, another evaluation setting reuses the trained runs.

``run_pipeline(request, root, stages)`` is the one ordering of the stages; ``stages`` holds the
callables that run them: :func:`plain_stages` (the library functions, ``imagegen pipeline
--no-prefect``) or the Prefect subflows (``flows/pipeline.py``).  Only ids and paths pass between
stages.  The report (:func:`imagegen.report.write_report`) lands in ``<data root>/reports/<id>/``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.artifacts import read_card
from imagegen.evaluate.metrics import ALL_METRICS, Metric
from imagegen.presets import base_data, deep_merge, parse_overrides
from imagegen.report import progress_line, report_dir, report_id, write_report
from models.teacher import METHODS, Method, lacks_v_prediction, methods_for, teacher_families

# ------------------------------------------------------------------------------------------ request


class _Stage(BaseModel):
    """A stage section: a few typed knobs (form fields in the Prefect UI) and ``overrides``, a
    partial config deep-merged over the stage's preset.  Keys that are not knobs go to ``overrides``,
    so ``--set train.model.image_size=16`` and ``{"train": {"overrides": {"model": ...}}}`` agree."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _route_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            extra = {k: v for k, v in data.items() if k not in cls.model_fields}
            if extra:
                data = {k: v for k, v in data.items() if k in cls.model_fields}
                data["overrides"] = deep_merge(dict(data.get("overrides") or {}), extra)
        return data


class CurateStage(_Stage):
    preset: Literal["smoke", "demo"] | None = Field("smoke", description="Curate preset (imagegen.presets)")
    n_images: int | None = Field(None, ge=1, le=100_000, description="Base scenes of the world "
                                 "(source.publish.n_images; None = the preset's)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Partial CurateConfig merged over "
                                      "the preset, e.g. {\"download\": {\"timeout\": 3}}")


class TrainStage(_Stage):
    preset: Literal["smoke", "demo", "gpu"] | None = Field("smoke", description="Train preset "
                                                           "(imagegen.train.presets.TRAIN_PRESETS)")
    family: str | None = Field(None, min_length=1, description="Model family (None = the preset's), "
                               "e.g. flow, ddpm, edm")
    steps: int | None = Field(None, ge=1, le=100_000_000, description="Optimizer steps (None = the preset's)")
    nproc: int | None = Field(None, ge=1, le=1024, description="Processes (GPUs); >1 launches torchrun")
    timeout_s: float | None = Field(None, gt=0, description="Kill the training after this long")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Partial training config "
                                      "(TrainConfig) merged over the preset, e.g. {\"lr\": 3e-4}")


class DistillStage(_Stage):
    method: Method | None = Field("reflow", description="progressive (DDPM v-prediction teacher), reflow "
                                  "(flow teacher), consistency (EDM teacher); None skips distillation")
    steps: int | None = Field(None, ge=1, le=10_000_000, description="Training steps per student")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Other DistillRequest fields, "
                                      "e.g. {\"pairs\": 256}")


class EvaluateStage(_Stage):
    n_samples: int | None = Field(None, ge=2, le=1_000_000, description="Images generated per model "
                                  "for FID/KID/CLIPScore")
    metrics: tuple[Metric, ...] | None = Field(None, min_length=1, description="Metrics (None = all)")
    teacher_steps: int | None = Field(None, ge=1, le=10_000, description="Sampler steps of the teacher (None = "
                                      "its family's default; the student samples at its own default)")
    guidance: float | None = Field(None, ge=0.0, le=100.0, description="CFG scale for teacher and student "
                                   "(None: the guidance the student was distilled with for the teacher, "
                                   "1 for a reflow/consistency student)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Other EvalRequest fields, applied "
                                      "to teacher and student alike, e.g. {\"kid_subsets\": 50}")


class PipelineRequest(BaseModel):
    """Every parameter of the pipeline flow (the Prefect UI renders it as the run form).

    Checked as a whole before any work: each stage's config validates, and the distillation
    method fits the teacher's family."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    curate: CurateStage = Field(default_factory=CurateStage)
    train: TrainStage = Field(default_factory=TrainStage)
    distill: DistillStage = Field(default_factory=DistillStage)
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage)

    @model_validator(mode="after")
    def _check_stages(self) -> "PipelineRequest":
        cfg = curate_config(self)
        treq = train_request(self, cfg.name)
        check_method_fits(self, treq.train)
        if self.distill.method is not None:
            distill_request(self, "teacher-run")
        _eval_request(self, "teacher-run", {})
        return self


# Presets: partial PipelineRequest dicts.  Measured figures: README "Pipeline" (benchmarks/README.md).
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    # a few minutes on 2 CPU cores: the smoke dataset, a class-conditional flow U-Net, a 1-step reflow
    # student, and FD (reference CLIP) / KID / CLIPScore of both on 200 images
    "smoke": {
        "curate": {"preset": "smoke"},
        "train": {"preset": "smoke", "steps": 200},
        "distill": {"method": "reflow", "steps": 150,
                    "overrides": {"pairs": 256, "pair_steps": 8, "pair_sampler": "heun", "report_count": 8}},
        "evaluate": {"n_samples": 200, "teacher_steps": 20, "metrics": list(ALL_METRICS),
                     "overrides": {"kid_subsets": 50}},
    },
    # tens of minutes on CPU: the demo dataset, a text-conditioned flow U-Net, reflow, GenEval included
    "demo": {
        "curate": {"preset": "demo"},
        "train": {"preset": "demo"},
        "distill": {"method": "reflow", "steps": 1000,
                    "overrides": {"pairs": 2000, "pair_steps": 25, "pair_sampler": "heun"}},
        "evaluate": {"n_samples": 1000, "metrics": list(ALL_METRICS),
                     "overrides": {"geneval_per_prompt": 1}},
    },
    # one or more GPUs: the gpu training preset (DiT-B/2, bf16) on the demo dataset, a reflow student,
    # and evaluation on 10k images with the official 4 images per GenEval prompt
    "gpu": {
        "curate": {"preset": "demo"},
        "train": {"preset": "gpu"},
        "distill": {"method": "reflow", "steps": 20_000,
                    "overrides": {"pairs": 50_000, "pair_steps": 50, "pair_sampler": "heun"}},
        "evaluate": {"n_samples": 10_000, "metrics": list(ALL_METRICS),
                     "overrides": {"geneval_per_prompt": 4, "batch_size": 256}},
    },
}


def stage_presets(stage: str, knobs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each pipeline preset's ``stage`` section as a partial request of that stage's own command
    (its ``overrides`` plus the ``knobs`` it sets): the presets of ``imagegen distill`` and
    ``imagegen evaluate``, so a stage run alone and inside the pipeline share their settings."""
    out: dict[str, dict[str, Any]] = {}
    for name, preset in PIPELINE_PRESETS.items():
        section = preset.get(stage, {})
        out[name] = {**copy.deepcopy(section.get("overrides", {})),
                     **{k: copy.deepcopy(section[k]) for k in knobs if section.get(k) is not None}}
    return out


# distillation and evaluation settings per preset (teacher, method and run come from the command)
DISTILL_PRESETS = stage_presets("distill", ("steps",))
EVAL_PRESETS = stage_presets("evaluate", ("n_samples", "metrics"))


def build_request(preset: str | None = "smoke", request: PipelineRequest | None = None,
                  overrides: list[str] | None = None) -> PipelineRequest:
    """The validated request: ``request`` (else ``preset``), then ``overrides`` such as
    ``train.family=ddpm``, ``distill.method=null``, ``curate.n_images=100``,
    ``train.model.image_size=16`` (a stage's knob, else a key of its config; values JSON when
    they parse)."""
    changes = parse_overrides(overrides)
    unknown = sorted(set(changes) - set(PipelineRequest.model_fields))
    if unknown:
        raise ValueError(f"pipeline overrides start with a stage ({', '.join(PipelineRequest.model_fields)}); "
                         f"got {unknown}, e.g. train.steps=50 or curate.download.timeout=3")
    base = base_data(PipelineRequest, PIPELINE_PRESETS, preset, request, what="pipeline preset")
    if request is not None and not changes:
        return request
    merged = copy.deepcopy(base)
    for stage, change in changes.items():
        if not isinstance(change, dict):
            raise ValueError(f"pipeline override {stage}={change!r} names a whole stage; set one of its "
                             f"fields, e.g. {stage}.<field>=VALUE")
        merged[stage] = deep_merge(_routed(stage, base.get(stage) or {}), _routed(stage, change))
    return PipelineRequest.model_validate(merged)


def _routed(stage: str, data: dict[str, Any]) -> dict[str, Any]:
    """A stage section with its non-knob keys moved into ``overrides``."""
    cls = {"curate": CurateStage, "train": TrainStage, "distill": DistillStage, "evaluate": EvaluateStage}[stage]
    return cls._route_unknown_keys(dict(data))


def _dotted(data: dict[str, Any], prefix: str = "") -> list[str]:
    """{"a": {"b": 1}} -> ["a.b=1"] (the overrides syntax of the stage flows)."""
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def _stage_error(stage: str, exc: Exception) -> ValueError:
    return ValueError(f"{stage} stage: {exc}")


def curate_config(request: PipelineRequest) -> Any:
    """The curate stage's CurateConfig: its preset, then ``overrides``, then ``n_images``."""
    from imagegen.curate import CurateConfig
    from imagegen.presets import CURATE_PRESETS, build_config

    c = request.curate
    over = dict(c.overrides)
    if c.n_images is not None:
        over = deep_merge(over, {"source": {"publish": {"n_images": c.n_images}}})
    try:
        return build_config(CurateConfig, CURATE_PRESETS, c.preset, over)
    except ValueError as exc:
        raise _stage_error("curate", exc) from None


_OWNED = {"train": ("dataset",), "distill": ("teacher", "method"), "evaluate": ("run", "folder")}


def _refuse_owned(stage: str, overrides: dict[str, Any]) -> None:
    owned = [k for k in _OWNED[stage] if k in overrides]
    if owned:
        why = {"dataset": "the pipeline trains on the dataset its curate stage makes (change curate.*)",
               "teacher": "the teacher is the run the train stage makes",
               "method": "set distill.method",
               "run": "the pipeline evaluates its teacher and student runs",
               "folder": "the pipeline evaluates its teacher and student runs"}
        raise ValueError(f"{stage}.{owned[0]} cannot be set: {why[owned[0]]}")


def train_request(request: PipelineRequest, dataset: str) -> Any:
    """The train stage's TrainRequest on ``dataset`` (the curated dataset's id), built as the train
    flow builds one: preset, overrides, then the named family/steps/nproc (switching family keeps
    only the model fields the new family knows)."""
    from imagegen.requests import build_train_request

    t = request.train
    _refuse_owned("train", t.overrides)
    over = _dotted({"train": t.overrides}) if t.overrides else []
    if t.timeout_s is not None:
        over.append(f"timeout_s={json.dumps(t.timeout_s)}")
    try:
        return build_train_request(t.preset, None, over, dataset=dataset, family=t.family, steps=t.steps,
                                   nproc=t.nproc)
    except ValueError as exc:
        raise _stage_error("train", exc) from None


def check_method_fits(request: PipelineRequest, train_cfg: Any) -> None:
    method = request.distill.method
    if method is None:
        return
    family = train_cfg.family
    if family not in teacher_families(method):
        fits = methods_for(family, METHODS)
        raise ValueError(f"distill.method={method} needs a {' or '.join(teacher_families(method))} teacher; the train "
                         f"stage trains family {family!r} (set distill.method="
                         f"{fits[0] if fits else 'null'}{' or null to skip distillation' if fits else ''})")
    if lacks_v_prediction(method, family, train_cfg.model):
        raise ValueError("distill.method=progressive needs a v-prediction DDPM teacher; set "
                         "train.model.prediction=v (or distill.method=null)")


def distill_request(request: PipelineRequest, teacher: str) -> Any:
    from imagegen.distill_config import DistillRequest

    d = request.distill
    if d.method is None:
        raise ValueError("distill.method is None: the pipeline skips distillation")
    _refuse_owned("distill", d.overrides)
    data = {**d.overrides, "teacher": teacher, "method": d.method}
    if d.steps is not None:
        data["steps"] = d.steps
    try:
        return DistillRequest.model_validate(data)
    except ValueError as exc:
        raise _stage_error("distill", exc) from None


def _eval_request(request: PipelineRequest, run: str, extra: dict[str, Any], teacher: bool = False) -> Any:
    from imagegen.evaluate.request import EvalRequest

    e = request.evaluate
    _refuse_owned("evaluate", e.overrides)
    data = {**extra, **e.overrides, "run": run}
    for key in ("n_samples", "metrics", "guidance"):
        if getattr(e, key) is not None:
            data[key] = getattr(e, key)
    if teacher and e.teacher_steps is not None:
        data["steps"] = e.teacher_steps
    try:
        return EvalRequest.model_validate(data)
    except ValueError as exc:
        raise _stage_error("evaluate", exc) from None


def eval_requests(request: PipelineRequest, dataset_id: str, teacher_run: str, teacher_cfg: dict[str, Any],
                  distill: Any | None = None, student_run: str | None = None) -> dict[str, Any]:
    """EvalRequests of the teacher and (when distilled) the student, with the same settings.

    Both are measured against the curated dataset (a reflow student's own dataset is its teacher's
    samples).  Unless ``evaluate.guidance`` is set: the teacher is sampled with the guidance the
    student learned from (reflow pairs: ``pair_guidance`` or the teacher's ``sample_guidance``;
    consistency: ``teacher_guidance``; otherwise the teacher's ``sample_guidance``), and a reflow or
    consistency student, which has that guidance distilled in, with none.  ``evaluate.teacher_steps``
    sets the teacher's sampler steps (the student samples at its own default)."""
    conditional = teacher_cfg.get("model", {}).get("conditioning", "none") != "none"
    own = float(teacher_cfg.get("sample_guidance", 1.0))
    learned, student_guidance = (distill.guidance(conditional, own) if distill is not None
                                 else (own if conditional else 1.0, 1.0))
    auto = request.evaluate.guidance is None
    out = {"teacher": _eval_request(request, teacher_run, {"guidance": learned} if auto else {}, teacher=True)}
    if student_run is not None:
        extra: dict[str, Any] = {"guidance": student_guidance} if auto else {}
        if "reference" not in request.evaluate.overrides:
            extra["reference"] = dataset_id
        out["student"] = _eval_request(request, student_run, extra)
    return out


# ------------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Stages:
    """How each stage runs: each takes its validated request and the data root and returns the
    stage's summary (ids and paths).  ``evaluate`` also gets the role (``teacher`` / ``student``)."""

    curate: Callable[[Any, Path], dict[str, Any]]
    train: Callable[[Any, Path], dict[str, Any]]
    distill: Callable[[Any, Path], dict[str, Any]]
    evaluate: Callable[[Any, Path, str], dict[str, Any]]


def plain_stages(note: Callable[[str], None] | None = None) -> Stages:
    """The library functions, in this process (``imagegen pipeline --no-prefect``); ``note`` gets
    one progress line at a time."""
    say = note or (lambda line: None)

    def curate(cfg: Any, root: Path) -> dict[str, Any]:
        from imagegen import curate as C

        ref = C.curate(cfg, root, progress=lambda st, r: say(f"[curate] {st} {'cached' if r.cached else 'done'} "
                                                             f"{r.id}"))
        return {"dataset_id": ref.id, "path": str(ref.path)}

    def train(req: Any, root: Path) -> dict[str, Any]:
        from imagegen.train.runs import train_run

        return train_run(req, root, progress=lambda info: say(f"[train] {progress_line(info)}"))

    def distill(req: Any, root: Path) -> dict[str, Any]:
        from imagegen.distill import distill as run_distill

        return run_distill(req, root, progress=lambda info: say(f"[distill] {progress_line(info)}"))

    def evaluate(req: Any, root: Path, role: str) -> dict[str, Any]:
        from imagegen.evaluate.run import run_evaluation

        say(f"[evaluate] {role} run {req.run}")
        return run_evaluation(req, root)

    return Stages(curate, train, distill, evaluate)


def run_pipeline(request: PipelineRequest, root: Path | str, stages: Stages,
                 note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """curate -> train -> distill (unless ``distill.method`` is None) -> evaluate teacher and student,
    then the report.  Returns the pipeline summary (``summary_result`` trims it for callers)."""
    from imagegen.paths import ensure_writable
    from imagegen.train.runs import get_run

    say = note or (lambda line: None)
    root = ensure_writable(Path(root))
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    flow_runs: dict[str, str] = {}

    def timed(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = fn()
        seconds[name] = round(time.perf_counter() - t0, 2)
        cpu_seconds[name] = round(_cpu_seconds() - c0, 2)
        if out.get("flow_run_id"):
            flow_runs[name] = str(out["flow_run_id"])
        say(f"[pipeline] {name} done in {seconds[name]:.1f} s ({cpu_seconds[name]:.1f} CPU-s)")
        return out

    cfg = curate_config(request)
    cur = timed("curate", lambda: stages.curate(cfg, root))
    dataset = dataset_summary(Path(cur["path"]))
    treq = train_request(request, dataset["id"])
    trained = timed("train", lambda: stages.train(treq, root))
    teacher_cfg = get_run(root, trained["run_id"]).card["config"]
    dreq = distilled = None
    if request.distill.method is not None:
        dreq = distill_request(request, trained["run_id"])
        distilled = timed("distill", lambda: stages.distill(dreq, root))
    ereqs = eval_requests(request, dataset["id"], trained["run_id"], teacher_cfg, dreq,
                          distilled["student_run"] if distilled else None)
    evals = {role: timed(f"evaluate_{role}", lambda r=role, q=q: stages.evaluate(q, root, r))
             for role, q in ereqs.items()}
    summary = {
        "request": request.model_dump(mode="json"),
        "data_root": str(root),
        "dataset": dataset,
        "teacher": _train_part(trained),
        "distill": _distill_part(distilled) if distilled else None,
        "evaluations": {role: _eval_part(s, ereqs[role]) for role, s in evals.items()},
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "flow_runs": flow_runs,
    }
    summary["report_id"] = report_id(summary)
    t0 = time.perf_counter()
    md, page = write_report(summary, report_dir(root, summary))
    seconds["report"] = round(time.perf_counter() - t0, 2)
    summary["report"] = {"id": summary["report_id"], "dir": str(md.parent), "markdown": str(md), "html": str(page)}
    return summary


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (img2dataset, torchrun ranks): on a shared
    machine it says what a stage costs better than its wall time."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def summary_result(summary: dict[str, Any]) -> dict[str, Any]:
    """What the flow and ``imagegen pipeline --json`` return: ids, metrics, report paths, seconds."""
    evals = summary["evaluations"]
    return {"dataset_id": summary["dataset"]["id"], "teacher_run": summary["teacher"]["run_id"],
            "student_run": (summary["distill"] or {}).get("student_run"),
            "eval_ids": {role: e["eval_id"] for role, e in evals.items()},
            "metrics": {role: e["metrics"] for role, e in evals.items()},
            "skipped": {role: e["skipped"] for role, e in evals.items()},
            "report": summary["report"], "seconds": summary["seconds"], "cpu_seconds": summary["cpu_seconds"],
            "flow_runs": summary["flow_runs"]}


def dataset_summary(path: Path) -> dict[str, Any]:
    """The dataset card's summary: counts, accounting of every input row, caption accuracy."""
    card = read_card(path)
    counts = card.get("counts", {})
    wr = card.get("world_report") or {}
    grid = path / "samples.png"
    return {"id": card["id"], "name": card.get("name"), "path": str(path),
            "samples": counts.get("shard", {}).get("samples"), "shards": counts.get("shard", {}).get("shards"),
            "bytes": counts.get("shard", {}).get("bytes"), "input_rows": counts.get("download", {}).get("input_rows"),
            "accounting": counts.get("accounting", {}), "stage_ids": card.get("stage_ids", {}),
            "caption_accuracy": {k: wr[f"caption_accuracy_{k}"] for k in ("alt_text", "final")
                                 if f"caption_accuracy_{k}" in wr},
            "reference_clip": card.get("reference_clip"), "grid": str(grid) if grid.is_file() else None}


def _train_part(s: dict[str, Any]) -> dict[str, Any]:
    keys = ("run_id", "run_dir", "dataset_id", "family", "step", "last_losses", "loss_curve", "samples",
            "reused", "steps_per_s", "seconds")
    return {k: s.get(k) for k in keys}


def _distill_part(s: dict[str, Any]) -> dict[str, Any]:
    return {"method": s["method"], "teacher_run": s["teacher_run"], "student_run": s["student_run"],
            "dataset_id": s["dataset_id"], "rounds": s["rounds"], "report": s["report"], "seconds": s["seconds"]}


def _eval_part(s: dict[str, Any], req: Any) -> dict[str, Any]:
    keys = ("eval_id", "path", "metrics", "skipped", "run_id", "family", "sampler", "steps", "nfe", "guidance",
            "n_samples", "seconds", "metrics_file")
    return {**{k: s.get(k) for k in keys}, "reference": req.reference}
