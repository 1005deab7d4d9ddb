"""One engine per curate: inside ``shared_executors`` every executor of a cluster spec is the one
started for it, closed when the context ends (also on an error)."""

from __future__ import annotations

import logging
import os
import time

import psutil
import pytest

from imagegen import executors as E


def _pid(_: object) -> int:
    return os.getpid()


def _gone(pids: set[int], within: float = 30.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_one_dask_cluster_serves_every_stage_and_is_closed_on_error(tmp_path, caplog):
    """Two stages' executors (dask:2) inside one ``shared_executors``: the same executor and the same two
    worker processes run both stages' map steps, one cluster is started in all, and an error in the
    second stage closes it (its worker processes exit)."""
    pytest.importorskip("distributed")
    caplog.set_level(logging.INFO, logger="imagegen.executors")
    with pytest.raises(RuntimeError, match="the second stage failed"):
        with E.shared_executors() as engines:
            with E.executor("dask:2", root=tmp_path / "a") as first:
                workers = set(first.client.run(os.getpid).values())
                assert len(workers) == 2 and set(first.map(_pid, range(6))) <= workers
                # glibc's own trim threshold (Dask's default 64 KiB mmaps every image buffer), one thread each
                env = first.client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
                assert set(env.values()) == {(None, "1")}, env
            assert list(engines) == ["dask:2"]
            with E.executor("dask:2", root=tmp_path / "b") as second:
                assert second is first
                assert set(second.client.run(os.getpid).values()) == workers  # the same processes
                assert set(second.map(_pid, range(6))) <= workers
                raise RuntimeError("the second stage failed")
    started = [r for r in caplog.records if "started the Dask scheduler" in r.getMessage()]
    closed = [r for r in caplog.records if "closed the Dask cluster" in r.getMessage()]
    assert len(started) == 1 and len(closed) == 1
    assert _gone(workers), "the cluster's worker processes outlived the curate"
    # outside the context an executor is its own again: started and closed around its block
    with E.executor("local:2") as ex:
        assert ex not in engines.values()


def test_local_runners_are_not_shared_and_nesting_keeps_the_outer_engines():
    with E.shared_executors() as outer:
        with E.shared_executors() as inner:
            assert inner is outer
        with E.executor("local:2") as a, E.executor("local:2") as b:
            assert a is not b and a.map(_pid, [1, 2]) and outer == {}
