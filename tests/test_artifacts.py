"""Artifacts: first writer wins, stale temporaries of dead processes are swept."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.artifacts import is_complete, owner_file, read_card, stage_output, sweep_stale


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_complete_folder_is_never_replaced(tmp_path: Path) -> None:
    final = tmp_path / "stage" / "abc"
    with stage_output(final) as (tmp, card):
        (tmp / "data.bin").write_bytes(b"first")
        card["who"] = "first"
    inode = final.stat().st_ino
    held = open(final / "data.bin", "rb")  # a reader holding the artifact open
    with stage_output(final) as (tmp, card):
        (tmp / "data.bin").write_bytes(b"second")
        card["who"] = "second"
    assert final.stat().st_ino == inode, "the complete folder was replaced"
    assert read_card(final)["who"] == "first"
    assert (final / "data.bin").read_bytes() == b"first" and held.read() == b"first"
    held.close()
    assert sorted(p.name for p in final.parent.iterdir()) == ["abc"], "the loser's copy is left"
    assert not list(final.iterdir()) == [] and sorted(p.name for p in final.iterdir()) == ["card.json", "data.bin"]


def test_incomplete_final_folder_is_replaced(tmp_path: Path) -> None:
    final = tmp_path / "abc"
    final.mkdir()
    (final / "half").write_text("x")
    with stage_output(final) as (tmp, card):
        assert list(tmp.iterdir()) == []  # a stage may insist on an empty folder
        (tmp / "data").write_text("ok")
    assert is_complete(final) and (final / "data").read_text() == "ok" and not (final / "half").exists()


def test_failed_writer_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "abc"
    with pytest.raises(RuntimeError):
        with stage_output(final) as (tmp, card):
            (tmp / "x").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = tmp_path / f"old.tmp-{dead}"          # the old layout, pid only in the name
    stale.mkdir()
    (stale / "partial.tar").write_bytes(b"x" * 10)
    os.utime(stale, (0, 0))
    stale2 = tmp_path / f"other.tmp-{dead}-abcdef"  # the new layout with an owner file
    stale2.mkdir()
    owner_file(stale2).write_text(json.dumps({"host": os.uname().nodename, "pid": dead}))
    live = tmp_path / f"busy.tmp-{os.getpid()}-123456"  # a live writer: left alone
    live.mkdir()
    owner_file(live).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    foreign = tmp_path / f"far.tmp-{dead}-654321"  # another host's writer: its pid means nothing here
    foreign.mkdir()
    owner_file(foreign).write_text(json.dumps({"host": "some-other-host", "pid": dead}))
    with stage_output(tmp_path / "new") as (tmp, card):
        pass
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["new", live.name, owner_file(live).name, foreign.name, owner_file(foreign).name])
    assert sweep_stale(tmp_path) == []


def _race(final: str, tag: str, barrier) -> str:
    barrier.wait()
    with stage_output(Path(final)) as (tmp, card):
        (tmp / "payload").write_bytes(b"same bytes" * 1000)
        card["writer"] = tag
    return read_card(Path(final))["writer"]


def test_concurrent_writers_agree_on_one_folder(tmp_path: Path) -> None:
    final = tmp_path / "abc"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as m:
        barrier = m.Barrier(4)
        with ctx.Pool(4) as pool:
            seen = pool.starmap(_race, [(str(final), f"w{i}", barrier) for i in range(4)])
    assert len(set(seen)) == 1, seen  # every writer returned the same complete folder
    assert [p.name for p in tmp_path.iterdir()] == ["abc"]
    assert (final / "payload").read_bytes() == b"same bytes" * 1000
