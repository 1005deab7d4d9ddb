"""Every problem of a config in one refusal (issue 12: a request with five mistakes took five rounds).

Pydantic reports all field errors of a model together, but its cross-field checks
(``model_validator(mode="after")``) run only once every field is valid, and each stops at its
first ``raise``.  A config built on :class:`AllProblems` writes its cross-field checks as
``problems(p)``, which adds every problem it finds (subclasses extend it, calling ``super()``),
and they are reported together with the field errors:

- all cross-field problems of the config and its base classes at once;
- when some fields are invalid, the checks run again with those fields at their defaults, and
  each check that reads none of them (``p.can(*fields)``) still reports.  A required field that is
  invalid has no default: then only the field errors are reported.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator
from pydantic_core import PydanticCustomError

# (config class, its invalid fields) while a second pass checks what those fields do not touch
_PARTIAL: ContextVar[tuple[type, frozenset[str]] | None] = ContextVar("imagegen_checks_partial", default=None)


class Problems:
    """The cross-field problems of one config, collected instead of raised one at a time."""

    def __init__(self, name: str, bad: frozenset[str] = frozenset()) -> None:
        self.name, self.bad, self.items = name, bad, []

    def can(self, *fields: str) -> bool:
        """Whether a check reading ``fields`` can be judged (none of them is invalid)."""
        return not self.bad.intersection(fields)

    def add(self, message: str) -> None:
        self.items.append(message)


class ProblemsError(ValueError):
    """Raised by :class:`AllProblems` with every problem; ``items`` holds them one by one."""

    def __init__(self, name: str, items: list[str]) -> None:
        self.items = list(items)
        lines = "\n".join(f"  - {m}" for m in self.items)
        super().__init__(f"{name}: {len(self.items)} problem{'s' if len(self.items) > 1 else ''}:\n{lines}"
                         if len(self.items) > 1 else f"{name}: {self.items[0]}")


def _custom(error: dict[str, Any]) -> dict[str, Any]:
    """A reported error again as an error to raise (type and message kept, any error type)."""
    msg = error["msg"].replace("{", "{{").replace("}", "}}")
    return {"type": PydanticCustomError(error["type"], msg), "loc": error["loc"], "input": error.get("input")}


class AllProblems(BaseModel):
    """Base of configs whose cross-field checks are all reported at once (see the module doc)."""

    def problems(self, p: Problems) -> None:
        """Add every cross-field problem to ``p`` (override, calling ``super().problems(p)``)."""

    @model_validator(mode="after")
    def _all_problems(self) -> Any:
        partial = _PARTIAL.get()
        bad = partial[1] if partial is not None and partial[0] is type(self) else frozenset()
        p = Problems(type(self).__name__, bad)
        self.problems(p)
        if p.items:
            raise ProblemsError(type(self).__name__, p.items)
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _with_field_errors(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            bad = frozenset(e["loc"][0] for e in errors if e["loc"] and isinstance(e["loc"][0], str))
            fields = cls.model_fields
            if (not bad or not isinstance(data, dict) or not bad <= set(fields)
                    or any(fields[f].is_required() for f in bad)):
                raise
            extra = cls._partial_problems({k: v for k, v in data.items() if k not in bad}, bad, handler)
            known = {e["msg"] for e in errors}
            extra = [e for e in extra if e["msg"] not in known]
            if not extra:
                raise
            raise ValidationError.from_exception_data(cls.__name__, [_custom(e) for e in [*errors, *extra]]) from None

    @classmethod
    def _partial_problems(cls, data: dict[str, Any], bad: frozenset[str], handler: Any) -> list[dict[str, Any]]:
        """The cross-field problems that do not read an invalid field (those are at their defaults)."""
        token = _PARTIAL.set((cls, bad))
        try:
            obj = handler(data)
        except ValidationError as again:  # the after-check ran inside the handler
            return [e for e in again.errors(include_url=False)
                    if not e["loc"] and isinstance((e.get("ctx") or {}).get("error"), ProblemsError)]
        except Exception:  # noqa: BLE001 - a second pass that cannot run adds nothing
            return []
        finally:
            _PARTIAL.reset(token)
        p = Problems(cls.__name__, bad)
        try:
            obj.problems(p)
        except Exception:  # noqa: BLE001
            return []
        if not p.items:
            return []
        err = ProblemsError(cls.__name__, p.items)
        return [{"type": "value_error", "loc": (), "msg": f"Value error, {err}", "input": data}]
