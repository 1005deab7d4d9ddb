"""The data root: one folder holding the dataset registry, datasets, stage outputs, models and runs.

Resolved from an explicit argument, else ``$IMAGEGEN_DATA_ROOT``, else ``./imagegen-data``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "IMAGEGEN_DATA_ROOT"
DEFAULT = "imagegen-data"


def data_root(root: str | Path | None = None) -> Path:
    value = root or os.environ.get(ENV_VAR) or DEFAULT
    return Path(value).expanduser().resolve()


def ensure_writable(root: Path) -> Path:
    """Create ``root`` if needed and prove it is writable; raise a clear error otherwise."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(
            f"data root {root} is not writable ({exc.strerror or exc}); "
            f"pass --data-root or set ${ENV_VAR} to a writable folder"
        ) from exc
    return root


def stage_dir(root: Path, stage: str, stage_id: str) -> Path:
    return root / "stages" / stage / stage_id


def models_dir(root: Path) -> Path:
    return root / "models"


def datasets_dir(root: Path) -> Path:
    return root / "datasets"
