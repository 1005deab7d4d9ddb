"""Validated requests from presets, ``key=value`` overrides and named parameters: one place for
the merging rules the command line, the flows and the pipeline share.

Each builder takes a full ``request`` (else a preset, else the defaults), merges the overrides
over it, then the named parameters (taken as they are: a dataset called ``123`` stays a string),
and validates the result, so a bad value is refused before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagegen.presets import base_data, deep_merge, parse_overrides


def build_train_request(preset: str | None = "smoke", request: Any = None, overrides: list[str] | None = None,
                        dataset: str | None = None, family: str | None = None, steps: int | None = None,
                        nproc: int | None = None, root: str | Path | None = None) -> Any:
    """The validated :class:`~imagegen.train.runs.TrainRequest`: ``request`` (else ``preset``), then
    ``overrides`` (``a.b=value``), then the named parameters.

    Overrides merge into the base, so base settings that only fit what an override replaces are
    dropped first: switching ``train.family`` keeps only the model fields the new
    family knows, and switching ``train.model.net`` drops the base's ``net_overrides`` (the smoke
    preset's U-Net levels mean nothing to a DiT); overrides given alongside still apply.  A family
    built on a base run (``personalize``, ``controlnet``: its ``base_fields``) takes those fields
    and the class settings (``label_keywords``, ``label_field``, ``classes``) from the base run's
    checkpoint instead of the preset's (a ``run:<id>`` base is looked up under ``root``).
    """
    from imagegen.train.config import TrainRequest
    from imagegen.train.presets import TRAIN_PRESETS

    named_train = {k: v for k, v in {"family": family, "steps": steps}.items() if v is not None}
    named = {k: v for k, v in {"dataset": dataset, "nproc": nproc, "train": named_train}.items() if v not in (None, {})}

    def prepare(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
        base = _without_switched(base, changes)
        return _from_base_run(base, changes, root) if request is None else base

    return _build(TrainRequest, TRAIN_PRESETS, preset, request, overrides, named, prepare)


BASE_CLASS_FIELDS = ("label_keywords", "label_field", "classes")


def _from_base_run(base: dict[str, Any], changes: dict[str, Any], root: str | Path | None) -> dict[str, Any]:
    """A preset's settings that a base-run family must share with its base, replaced by the base's."""
    import json

    train, new = base.get("train"), changes.get("train") or {}
    if not isinstance(train, dict) or not isinstance(new, dict):
        return base
    from models.registry import get_family

    try:
        fam_cls = get_family(new.get("family") or train.get("family"))
    except (ValueError, TypeError):
        return base  # validation names it
    pinned = tuple(getattr(fam_cls, "base_fields", ()))
    new_model = new.get("model") if isinstance(new.get("model"), dict) else {}
    ref = new_model.get("base") or (train.get("model") or {}).get("base")
    if not pinned or not isinstance(ref, str) or not ref:
        return base
    if ref.startswith("run:"):
        if root is None:
            return base
        from imagegen.train.runs import get_run

        try:
            ck = get_run(Path(root), ref[4:]).checkpoint
        except (LookupError, ValueError):
            return base  # the run layer names an unknown base run
        if ck is None:
            return base
    else:
        ck = Path(ref)
    state = Path(ck) / "state.json"
    if not state.is_file():
        return base
    cfg = json.loads(state.read_text()).get("config", {})
    theirs = cfg.get("model", {})
    model = {**(train.get("model") or {}), **{f: theirs[f] for f in pinned if f in theirs}}
    train = {**train, "model": model, **{f: cfg[f] for f in BASE_CLASS_FIELDS if f in cfg}}
    return {**base, "train": train}


def _build(model: Any, presets: dict[str, dict[str, Any]], preset: str | None, request: Any,
           overrides: list[str] | None, named: dict[str, Any], prepare: Any = None) -> Any:
    """``request`` (else the preset) <- overrides <- named values, validated as ``model``; the
    request itself when nothing changes it.  ``prepare(base, changes)`` may drop base settings
    the changes make meaningless."""
    changes = deep_merge(parse_overrides(overrides), {k: v for k, v in named.items() if v is not None})
    base = base_data(model, presets, preset, request)
    if request is not None and not changes:
        return request
    if prepare is not None:
        base = prepare(base, changes)
    return model.model_validate(deep_merge(base, changes))


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


def build_distill_request(request: Any = None, teacher: str | None = None, method: str | None = None,
                          overrides: list[str] | None = None, preset: str | None = None) -> Any:
    """The validated :class:`~imagegen.distill.DistillRequest`: ``request`` (else ``preset``, the
    distillation settings of that pipeline preset, else nothing), then ``overrides``
    (``key=value``, the value JSON when it parses), then the named ``teacher`` and ``method``,
    taken as they are."""
    from imagegen.distill_config import DistillRequest
    from imagegen.pipeline import DISTILL_PRESETS

    return _build(DistillRequest, DISTILL_PRESETS, preset, request, overrides, {"teacher": teacher, "method": method})


def natural_method(root: Path | str, teacher: str) -> str:
    """The distillation method for a teacher run when none is named: the first of the teacher
    table's methods that accepts the run's family (flow -> reflow, ddpm -> progressive, edm ->
    consistency); LookupError for an unknown run, ValueError for a family no method distils."""
    from imagegen.train.runs import get_run
    from models.hf_diffusers import is_diffusers_spec
    from models.teacher import METHODS, methods_for

    if is_diffusers_spec(teacher):
        return "lcm_lora"
    ref = get_run(Path(root), teacher)
    family = str((ref.card.get("config") or {}).get("family"))
    fits = methods_for(family, METHODS)
    if not fits:
        raise ValueError(f"teacher run {ref.id} is family {family!r}, which no distillation method distils "
                         f"(methods: {list(METHODS)}); name one with --method")
    return fits[0]


def check_distill_request(request: Any, root: Path | str) -> None:
    """The checks that need no work: the teacher run exists (LookupError), is finished and fits the
    method (RunError).  ``distill`` repeats them; doing them first keeps a bad teacher from
    starting a task (or, from the command line, a flow run)."""
    from imagegen.distill import teacher_run

    teacher_run(Path(root), request.teacher, request.method)
    if request.method == "lcm_lora":  # the distillation data, named in the request
        from imagegen.registry import get_dataset

        get_dataset(Path(root), str(request.dataset))


def build_eval_request(request: Any = None, run: str | None = None, folder: str | None = None,
                       overrides: list[str] | None = None, preset: str | None = None,
                       model: str | None = None) -> Any:
    """The validated :class:`~imagegen.evaluate.run.EvalRequest`: ``request`` (else ``preset``, the
    evaluation settings of that pipeline preset, else nothing), then ``overrides`` (``key=value``,
    the value JSON when it parses: ``metrics=["fid","kid"]``, ``steps=8``), then the named ``run`` /
    ``folder`` / ``model``, taken as they are (a run id ``123`` stays a string, a model path may hold
    ``=`` or look like JSON)."""
    from imagegen.evaluate.request import EvalRequest
    from imagegen.pipeline import EVAL_PRESETS

    named = {"run": run, "folder": folder, **({"model": model} if model is not None else {})}
    return _build(EvalRequest, EVAL_PRESETS, preset, request, overrides, named)


def check_eval_request(request: Any, root: Path | str) -> None:
    """The checks that need no work (``evaluate`` repeats them): the run is in the registry
    (LookupError) and has a checkpoint, the folder holds readable images of one size, the reference
    dataset exists, the sampler fits the family, guidance has a condition, the Inception weights
    are there for FID, a GenEval prompt file parses (its line number in the error).  Doing them first
    keeps bad input from starting a task (or, from the command line, a flow run)."""
    from imagegen.evaluate.run import check_request

    check_request(request, Path(root))
