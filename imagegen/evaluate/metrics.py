"""The metric table: one row per metric an evaluation request can name.

Everything else is derived from it: the names ``EvalRequest.metrics`` accepts (``Metric``), the
dispatch of :func:`imagegen.evaluate.run.evaluate` (each ``compute`` function once, in table
order), whether a generated set is needed, the evaluation's code version (the source of the
``modules`` of the requested metrics), and the leaderboard's better/worse direction of each
result column (:func:`higher_is_better`, by the column names a metric writes).

Adding a metric = one row here + its compute function ``(src, req, ctx) -> (rows, skip reason)``.
This module imports nothing heavy: the pipeline request validates metric names without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal


@dataclass(frozen=True)
class MetricSpec:
    name: str
    compute: str                 # "module:function"; metrics computed together share one function
    needs_generated_set: bool    # sampled images (or the folder's) rather than a layout of its own
    higher_is_better: bool
    columns: tuple[str, ...]     # prefixes of the result names it writes (metrics.parquet, leaderboard)
    modules: tuple[str, ...]     # the code its values depend on (hashed into the evaluation id)
    lower_columns: tuple[str, ...] = ()  # prefixes of its result names where lower is better after all

    def function(self) -> Callable[..., Any]:
        module, _, attr = self.compute.partition(":")
        return getattr(importlib.import_module(module), attr)


_RUN = "imagegen.evaluate.run"
_P1 = "imagegen.evaluate.phase1_rows"
_U = "imagegen.evaluate.uncertainty"  # intervals and sample-count flags of every row
_FD_MODULES = ("imagegen.evaluate.fid", "imagegen.clip", "imagegen.loader", "imagegen.evaluate.images",
               "imagegen.evaluate.bootstrap", _U)

METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("fid", f"{_RUN}:fid_kid_rows", True, False, ("FID", "FD-"), _FD_MODULES),
    MetricSpec("kid", f"{_RUN}:fid_kid_rows", True, False, ("KID", "KD-"), _FD_MODULES),
    MetricSpec("sfid", f"{_RUN}:sfid_rows", True, False, ("sFID",), ("imagegen.importers.fid_stats", *_FD_MODULES)),
    MetricSpec("clipscore", f"{_RUN}:clipscore_rows", True, True, ("CLIPScore",),
               ("imagegen.evaluate.clipscore", "imagegen.clip", "imagegen.evaluate.bootstrap", _U)),
    MetricSpec("geneval", f"{_RUN}:geneval_rows", False, True, ("GenEval",),
               ("imagegen.evaluate.geneval", "imagegen.world.geneval", "imagegen.world.detector",
                "imagegen.world.scene", "imagegen.evaluate.owl_detector", _U)),
    MetricSpec("fd_dinov2", f"{_P1}:fd_dinov2_rows", True, False, ("FD-DINOv2",),
               ("imagegen.evaluate.dinov2", "imagegen.evaluate.hf_models", *_FD_MODULES, _P1, _U)),
    MetricSpec("cmmd", f"{_P1}:cmmd_rows", True, False, ("CMMD",),
               ("imagegen.evaluate.cmmd", "imagegen.clip", "imagegen.evaluate.images", _P1, _U)),
    MetricSpec("prdc", f"{_P1}:prdc_rows", True, True, ("Precision", "Recall", "Density", "Coverage"),
               ("imagegen.evaluate.prdc", "imagegen.evaluate.dinov2", "imagegen.evaluate.hf_models", *_FD_MODULES,
                _P1, _U)),
    MetricSpec("inception_score", f"{_P1}:inception_score_rows", True, True, ("IS",),
               ("imagegen.evaluate.inception_score", "imagegen.evaluate.fid", _P1, _U)),
    MetricSpec("reward", f"{_P1}:reward_rows", True, True, ("Reward ",),
               ("imagegen.evaluate.rewards", "imagegen.filters.aesthetic_mlp", "imagegen.clip", _P1, _U)),
    MetricSpec("dpg", f"{_P1}:dpg_rows", False, True, ("DPG-Bench",),
               ("imagegen.evaluate.vqa", "imagegen.evaluate.hf_models", _P1, _U)),
    # issue 16: ControlNet / inpainting / SDEdit scored against held-out world scenes (imagegen/evaluate/control.py)
    MetricSpec("control", "imagegen.evaluate.control:control_rows", False, True, ("Control ",),
               ("imagegen.evaluate.control", "imagegen.world.detector", "imagegen.world.scene", "models.editing",
                "models.controlnet", _U),
               lower_columns=("Control inpaint unmasked max error", "Control SDEdit distance", "Control drift",
                              "Control trainable fraction")),
)}

Metric = Literal[tuple(METRICS)]  # type: ignore[valid-type]
KNOWN_METRICS: tuple[str, ...] = tuple(METRICS)
# what an evaluation computes when it names no metrics (and what the pipeline presets ask for): the
# metrics that need no extra model weights beyond the extractor; the others are asked for by name
ALL_METRICS: tuple[str, ...] = ("fid", "kid", "clipscore", "geneval")


def specs(names: Iterable[str]) -> list[MetricSpec]:
    """The table rows of ``names``, in table order."""
    wanted = set(names)
    unknown = sorted(wanted - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    return [m for m in METRICS.values() if m.name in wanted]


def needs_generated_set(names: Iterable[str]) -> bool:
    return any(m.needs_generated_set for m in specs(names))


def compute_functions(names: Iterable[str]) -> list[Callable[..., Any]]:
    """Each compute function of ``names`` once, in table order."""
    by_ref = {m.compute: m for m in specs(names)}
    return [m.function() for m in by_ref.values()]


def modules(names: Iterable[str]) -> list[ModuleType]:
    """The modules the values of ``names`` depend on, each once."""
    return [importlib.import_module(n) for n in dict.fromkeys(x for m in specs(names) for x in m.modules)]


def spec_of_column(column: str) -> MetricSpec | None:
    """The metric that writes result name ``column`` (``FD-CLIP-...`` -> fid, ``FD-DINOv2-...`` ->
    fd_dinov2: the longest matching prefix decides), None if none does."""
    best, length = None, -1
    for m in METRICS.values():
        for prefix in m.columns:
            if column.startswith(prefix) and len(prefix) > length:
                best, length = m, len(prefix)
    return best


def higher_is_better(column: str) -> bool:
    """Whether a larger value of result ``column`` is better (unknown columns: lower is better, as
    for distances)."""
    m = spec_of_column(column)
    return bool(m and m.higher_is_better and not column.startswith(m.lower_columns))
