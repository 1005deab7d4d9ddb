"""Frozen teachers for distillation families (models/progressive.py, reflow.py, consistency.py).

A distillation method is a family like any other, trained by the generic trainer; it holds a
frozen teacher loaded from a training checkpoint (safetensors; EMA weights when the run kept
them).  The teacher is not a submodule: its weights are in no optimizer, checkpoint, EMA copy
or DDP bucket; ``TeacherMixin._apply`` moves it with the student.  The student starts from
the teacher's weights (same network), so a student checkpoint is a complete model on its own.

Loading a student only to sample from it (evaluation) needs no teacher: inside
``inference_only()`` distillation families skip loading theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

if TYPE_CHECKING:  # no torch at import: the pipeline request checks teachers without it
    from torch import nn

# THE teacher table: the teacher families each distillation family accepts (a distillation method
# of imagegen.distill is the family of the same name).
TEACHERS: dict[str, tuple[str, ...]] = {"progressive": ("ddpm", "progressive"), "reflow": ("flow", "reflow"),
                                        "consistency": ("edm",), "dmd": ("flow", "reflow"),
                                        # a diffusers pipeline (``--teacher diffusers:PATH``), not a run
                                        "lcm_lora": ("diffusers",)}
# Methods whose run named as "teacher" is only the reference: consistency training (iCT) learns
# without a teacher, on that run's dataset with its network config (from scratch), and the NFE
# report compares the student with it.
REFERENCE_ONLY: dict[str, tuple[str, ...]] = {"ict": ("edm",)}
# the methods ``imagegen distill`` runs (each the family of the same name)
Method = Literal["progressive", "reflow", "consistency", "dmd", "ict", "lcm_lora"]
METHODS: tuple[str, ...] = get_args(Method)


def teacher_families(method: str) -> tuple[str, ...]:
    """The families whose run ``imagegen distill --method method`` accepts as its teacher."""
    return TEACHERS.get(method) or REFERENCE_ONLY[method]


def lacks_v_prediction(method: str, family: str, model: Mapping[str, Any]) -> bool:
    """Progressive distillation halves the DDIM steps of a v-prediction DDPM: True for a ``ddpm``
    teacher (model config ``model``) that predicts anything else."""
    return method == "progressive" and family == "ddpm" and model.get("prediction") != "v"


def methods_for(family: str, methods: tuple[str, ...] | None = None) -> list[str]:
    """The distillation families (restricted to ``methods`` when given) that accept a ``family``
    teacher, in table order."""
    return [m for m, fams in TEACHERS.items() if family in fams and (methods is None or m in methods)]


_INFERENCE_ONLY: ContextVar[bool] = ContextVar("imagegen_inference_only", default=False)


class TeacherError(ValueError):
    """A teacher that cannot serve this distillation method (says why)."""


@contextmanager
def inference_only() -> Iterator[None]:
    """Build families for sampling only: distillation families do not load their teachers."""
    token = _INFERENCE_ONLY.set(True)
    try:
        yield
    finally:
        _INFERENCE_ONLY.reset(token)


def loading_for_inference() -> bool:
    return _INFERENCE_ONLY.get()


class TeacherMixin:
    """For a Family subclass: ``self.teacher`` (frozen, outside the module tree), loaded from
    ``cfg.teacher`` unless building for inference; moved along with the student."""

    # teacher pairs and targets are made at the teacher's square size
    any_size: ClassVar[bool] = False

    def init_teacher(self, expected: tuple[str, ...] | None = None, check: Any = None) -> Any:
        """Load the teacher (a family whose name is in ``expected``, by default the teacher table's
        row of this family), run ``check(teacher)``, copy its network weights into the student's
        ``net``.  Returns it (None for inference)."""
        expected = TEACHERS[self.name] if expected is None else expected  # type: ignore[attr-defined]
        object.__setattr__(self, "_teacher", None)
        if loading_for_inference():
            return None
        ref = getattr(self.cfg, "teacher", None)
        if not ref:
            raise TeacherError(f"{type(self).__name__}: config field teacher (a checkpoint folder) is empty")
        if not Path(ref).is_dir():
            raise TeacherError(f"{type(self).__name__}: teacher checkpoint {ref} does not exist")
        from models.checkpoint import load_family

        teacher = load_family(ref)
        if teacher.name not in expected:
            raise TeacherError(f"{type(self).__name__} distils a {' or '.join(expected)} teacher; {ref} holds a "
                               f"{teacher.name!r} model")
        if check is not None:
            check(teacher)
        own = self.net.state_dict()
        theirs = teacher.net.state_dict()
        bad = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
        if bad or set(theirs) != set(own):
            raise TeacherError(f"{type(self).__name__}: the student's network does not match the teacher's "
                               f"({len(bad)} mismatched tensors, e.g. {bad[:3]}); the student must use the "
                               "teacher's net config")
        self.net.load_state_dict(theirs)
        object.__setattr__(self, "_teacher", teacher)
        return teacher

    @property
    def teacher(self) -> Any:
        t = self.__dict__.get("_teacher")
        if t is None:
            raise TeacherError(f"{type(self).__name__} was built for inference only (no teacher loaded)")
        return t

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        t = self.__dict__.get("_teacher")
        if t is not None:
            t._apply(fn, recurse)
        return out


def same_fields(student: Any, teacher: Any, fields: tuple[str, ...], where: str) -> None:
    """Refuse a student whose config differs from the teacher's on ``fields``."""
    diffs = [f"{f}: student {getattr(student, f)!r} != teacher {getattr(teacher, f)!r}" for f in fields
             if getattr(student, f) != getattr(teacher, f)]
    if diffs:
        raise TeacherError(f"{where}: the student must keep the teacher's settings; {'; '.join(diffs)}")


def frozen_copy(module: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(module)
    out.requires_grad_(False)
    return out
