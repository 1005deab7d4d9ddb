"""Stage outputs on disk: a folder named by content hash, written atomically, marked complete by a card.

A stage writes into ``<final>.tmp-<pid>``; when it finishes it writes ``card.json`` and renames
the folder to its final name.  A folder with a ``card.json`` is complete; anything else is
leftover from a killed run and is removed before the stage runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CARD = "card.json"


def is_complete(path: Path) -> bool:
    return (path / CARD).is_file()


def read_card(path: Path) -> dict[str, Any]:
    return json.loads((path / CARD).read_text())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


@contextmanager
def stage_output(final: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(tmp_dir, card)``; on success the card is written and ``tmp_dir`` becomes ``final``.

    The caller fills ``card`` (a dict) with counts and parameters.  On an exception the
    temporary folder is removed and nothing appears under ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    card: dict[str, Any] = {"created_unix": round(time.time(), 3)}
    try:
        yield tmp, card
        write_json_atomic(tmp / CARD, card)
        if final.exists():  # an incomplete leftover (complete ones are never rewritten)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
