"""Stage outputs on disk: a folder named by content hash, written atomically, marked complete by a card.

A stage writes into ``<final>.tmp-<pid>-<token>``; when it finishes it writes ``card.json`` and
renames the folder to its final name.  A folder with a ``card.json`` is complete and is never
rewritten: when two writers race for one id (two flow runs, two users of one data root) the first
rename wins and later writers discard their temporary copy and use the existing folder, so a
reader that has the folder open never sees it disappear.

A temporary folder's owner (host and pid) is recorded next to it in ``<tmp>.owner`` (outside,
so the stage sees an empty folder); temporaries whose owner is a dead process on this host are left-overs of a killed run and are removed the next time any
writer opens an output in the same parent folder (the next run of that stage).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

CARD = "card.json"
OWNER = ".owner"  # suffix of the file next to a temporary folder that names its writer


def owner_file(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + OWNER)


def is_complete(path: Path) -> bool:
    return (path / CARD).is_file()


def read_card(path: Path) -> dict[str, Any]:
    return json.loads((path / CARD).read_text())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_parquet_atomic(table: Any, path: Path) -> None:
    """Write a pyarrow table to ``path`` through a temporary next to it, so a reader never sees half a file."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_dead(tmp: Path) -> bool:
    """True when ``tmp`` was made by a process on this host that no longer runs.

    A folder without a readable ``.owner`` (an older layout, or killed between ``mkdir`` and the
    owner write) falls back to the pid in its name.  Folders of other hosts are left alone: their
    pids mean nothing here.
    """
    try:
        owner = json.loads(owner_file(tmp).read_text())
        if owner.get("host") != socket.gethostname():
            return False
        return not _pid_alive(int(owner["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tail = tmp.name.rsplit(".tmp-", 1)[-1]
    try:
        pid = int(tail.split("-", 1)[0])
    except ValueError:
        return False
    try:  # a fresh folder may be between mkdir and owner write: spare it for a minute
        if time.time() - tmp.stat().st_mtime < 60 and _pid_alive(pid):
            return False
    except OSError:
        return False
    return not _pid_alive(pid)


def sweep_stale(parent: Path) -> list[Path]:
    """Remove ``*.tmp-*`` folders under ``parent`` whose owner process is dead; return them."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for p in parent.glob("*.tmp-*"):
        if p.is_dir() and _owner_dead(p):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                owner_file(p).unlink(missing_ok=True)
                removed.append(p)
                log.info("removed %s, the temporary folder of a killed run", p)
        elif p.name.endswith(OWNER) and p.is_file():
            if not p.with_name(p.name[:-len(OWNER)]).exists():
                p.unlink(missing_ok=True)  # its folder is gone (published or removed)
        elif p.is_file() and p.name.startswith(".") and _owner_dead(p):
            p.unlink(missing_ok=True)  # a write_json_atomic temporary of a killed writer
            removed.append(p)
    return removed


def _discard(path: Path) -> None:
    """Remove a folder by first renaming it aside, so its name is free at once."""
    trash = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}-trash")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def publish(tmp: Path, final: Path) -> bool:
    """Rename the complete ``tmp`` to ``final`` unless a complete ``final`` exists.

    Returns True when this call put ``tmp`` in place, False when an existing complete folder
    won (``tmp`` is then removed).  ``os.rename`` of a directory onto a non-empty directory
    fails on POSIX, which is what makes the first writer win without a lock.
    """
    for _ in range(5):
        try:
            os.rename(tmp, final)
            return True
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
        if is_complete(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        # an incomplete folder under the final name (never made by this module): move it aside
        _discard(final)
    raise OSError(f"could not put {tmp} in place as {final}")


@contextmanager
def stage_output(final: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(tmp_dir, card)``; on success the card is written and ``tmp_dir`` becomes ``final``.

    The caller fills ``card`` (a dict) with counts and parameters.  On an exception the
    temporary folder is removed and nothing appears under ``final``.  If another writer
    completed ``final`` first, this writer's copy is discarded and ``final`` is left as it was
    (same id, same bytes: the existing folder is the answer).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    tmp.mkdir()
    owner_file(tmp).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    card: dict[str, Any] = {"created_unix": round(time.time(), 3)}
    try:
        yield tmp, card
        write_json_atomic(tmp / CARD, card)
        if not publish(tmp, final):
            log.info("%s was completed by another writer first; kept it, discarded this copy", final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        owner_file(tmp).unlink(missing_ok=True)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the body.

    For a work folder that several runs of one id would share (the shard stage's per-task outputs
    under ``<root>/parts/shard/<id>``): a second run waits for the first, then finds its outputs
    (or, once the first has finished and removed them, the published stage).  The file is removed
    on release; a waiter that wakes on a removed file takes the lock again on the new one."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder before us removed this file: lock the one in its place
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        except FileNotFoundError:
            pass
        os.close(fd)
