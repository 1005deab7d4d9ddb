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
                # glibc's own trim threshold (Dask's default 64 KiB mmaps every image buffer), cores // 2 threads each
                env = first.client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
                assert set(env.values()) == {(None, str(E.worker_threads(2)))}, env
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


def _threads_seen(_: object) -> tuple[int, int]:
    import pyarrow as pa
    import torch

    return pa.cpu_count(), torch.get_num_threads()


def test_thread_caps_per_worker_are_set_around_each_part_and_restored():
    """A part runs on cores // workers threads (torch, Arrow) in the process that runs it, map_threads
    overrides the count, and the caller's counts are back afterwards."""
    import pyarrow as pa
    import torch

    before = (pa.cpu_count(), torch.get_num_threads())
    cores = E.default_workers()
    assert E.worker_threads(1) == cores and E.worker_threads(2) == max(1, cores // 2)
    assert E.worker_threads(4 * cores) == 1
    with E.executor("local:1") as ex:
        assert ex.map(_threads_seen, [0]) == [(cores, cores)]
        with E.map_threads(1):
            assert ex.map(_threads_seen, [0, 1]) == [(1, 1), (1, 1)]
    assert (pa.cpu_count(), torch.get_num_threads()) == before
    with E.executor("local:2") as ex:  # pool workers: forked, so torch is loaded there too
        assert set(ex.map(_threads_seen, range(4))) == {(E.worker_threads(2), E.worker_threads(2))}
    with pytest.raises(ValueError, match="must be >= 1"):
        with E.thread_caps(0):
            pass


@pytest.mark.slow  # 50 s on 2 loaded cores (open_clip's import and model build dominate)
def test_part_bytes_do_not_depend_on_the_thread_count(tmp_path):
    """One part hashed (dedup) and scored (filter, with a CLIP score from a real open_clip model) on 1 and
    on 2 threads: the same parquet bytes.  The thread count is an execution knob, in no id."""
    import io

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from _helpers import tiny_random_clip
    from PIL import Image

    from imagegen.hashing import bytes_sha256
    from imagegen.stages.dedup import DedupConfig, run_dedup
    from imagegen.stages.filter import ClipScoreFilterConfig, FilterConfig, run_filter

    d = tmp_path / "dl"
    (d / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    blobs = []
    for i in range(40):
        im = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").resize((40, 40), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    keys = [f"{i:09d}" for i in range(40)]
    pq.write_table(pa.table({"key": keys, "row_id": pa.array(range(40), pa.int64()), "image": blobs,
                             "ext": ["jpg"] * 40, "sha256": [bytes_sha256(b) for b in blobs],
                             "caption": [f"a picture {i % 3}" for i in range(40)]}),
                   d / "images" / "part-00000.parquet", row_group_size=8)
    pd.DataFrame({"row_id": range(40), "key": keys, "status": "success", "original_width": 40,
                  "original_height": 40}).to_parquet(d / "ledger.parquet", index=False)
    clip = tiny_random_clip(tmp_path / "clip")
    cfg = FilterConfig(min_side=8, clip_score=ClipScoreFilterConfig(threshold=-1.0, batch_size=16))
    got = {}
    for n in (1, 2):
        out = tmp_path / f"t{n}"
        out.mkdir()
        with E.map_threads(n):
            run_dedup(d / "images", d / "ledger.parquet", DedupConfig(), out / "dedup.parquet", runner="local:1")
            counts = run_filter(d, out / "dedup.parquet", cfg, out / "filter.parquet", resolve_model=lambda s: clip,
                                runner="local:1")
        assert counts["images"] == 40
        got[n] = ((out / "dedup.parquet").read_bytes(), (out / "filter.parquet").read_bytes())
    assert pd.read_parquet(tmp_path / "t1" / "filter.parquet")["clip_score_score"].notna().all()
    assert got[1][0] == got[2][0], "dedup hashes differ between 1 and 2 threads"
    assert got[1][1] == got[2][1], "filter scores differ between 1 and 2 threads"


def test_dask_nanny_leaves_the_driver_environment_as_it_was(monkeypatch):
    """Dask's nanny writes its workers' thread caps (OMP_NUM_THREADS ...) into its own process's
    environment before each spawn; in a LocalCluster that is the driver.  After the cluster starts and
    after a worker is restarted, the driver has its own values back, and the workers have the caps."""
    pytest.importorskip("distributed")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")  # a value of the driver's own: kept, and Dask passes it on
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    cap = str(E.worker_threads(2))
    with E.executor("dask:2") as ex:
        env = lambda: tuple(os.environ.get(k) for k in E.THREAD_ENV)  # noqa: E731
        assert env() == (None, "7", None)
        assert set(ex.client.run(env).values()) == {(cap, "7", cap)}
        one = sorted(ex.client.scheduler_info()["workers"])[0]
        old = ex.client.run(os.getpid)
        ex.client.restart_workers([one])
        # the client's call returns once the scheduler has the new worker, which can be before the
        # nanny's instantiate (where the values are put back) has returned on the cluster's loop
        deadline = time.monotonic() + 30
        while env() != (None, "7", None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env() == (None, "7", None)
        now = ex.client.run(os.getpid)
        assert len(now) == 2 and set(now.values()) != set(old.values())  # a new worker process
        assert set(ex.client.run(env).values()) == {(cap, "7", cap)}
