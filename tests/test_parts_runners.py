"""Part-parallel map steps on the runners (local pool, a real Dask LocalCluster, Ray local):
the same bytes as one process, a killed worker's part run again, clear errors before work."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imagegen import executors as E
from imagegen.hashing import bytes_sha256
from imagegen.stages.dedup import DedupConfig, run_dedup
from imagegen.stages.filter import FilterConfig, run_filter

N_PARTS, PER_PART = 4, 12


def _img(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").resize((48, 48), Image.BICUBIC)
    if seed % 7 == 0:  # some blank images for the pixel_std filter
        grid = Image.new("RGB", (48, 48), (seed % 200, 90, 90))
    buf = io.BytesIO()
    grid.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def download_dir(tmp_path_factory) -> Path:
    """A download folder of N_PARTS image parts, with exact copies across parts."""
    d = tmp_path_factory.mktemp("dl")
    (d / "images").mkdir()
    rows = []
    for p in range(N_PARTS):
        keys, blobs = [], []
        for i in range(PER_PART):
            rid = p * PER_PART + i
            src = rid if rid % 5 else max(0, rid - 13)  # every 5th row repeats an earlier one
            keys.append(f"{rid:09d}")
            blobs.append(_img(src))
            rows.append((rid, f"{rid:09d}", 48 + rid % 3, 48 + rid % 3))
        pq.write_table(pa.table({"key": keys, "row_id": pa.array([int(k) for k in keys], pa.int64()),
                                 "image": blobs, "ext": ["jpg"] * len(keys),
                                 "sha256": [bytes_sha256(b) for b in blobs], "caption": ["a picture"] * len(keys)}),
                       d / "images" / f"part-{p:05d}.parquet", row_group_size=5)
    pd.DataFrame({"row_id": [r[0] for r in rows], "key": [r[1] for r in rows], "status": "success",
                  "original_width": [r[2] for r in rows], "original_height": [r[3] for r in rows]}
                 ).to_parquet(d / "ledger.parquet", index=False)
    return d


def _dedup(d: Path, out: Path, runner: str) -> bytes:
    run_dedup(d / "images", d / "ledger.parquet", DedupConfig(radius=4), out / "dedup.parquet", runner=runner)
    return (out / "dedup.parquet").read_bytes()


def _filter(d: Path, dedup: Path, out: Path, runner: str) -> pd.DataFrame:
    cfg = FilterConfig(clip_score=None, min_side=49)
    out.mkdir(parents=True, exist_ok=True)
    counts = run_filter(d, dedup, cfg, out / "filter.parquet", runner=runner)
    assert counts["images"] == N_PARTS * PER_PART
    return pd.read_parquet(out / "filter.parquet")


def test_local_pool_equals_one_process(download_dir, tmp_path):
    one = _dedup(download_dir, tmp_path / "a", "local:1")
    assert _dedup(download_dir, tmp_path / "b", "local:2") == one
    f1 = _filter(download_dir, tmp_path / "a" / "dedup.parquet", tmp_path / "fa", "local:1")
    f2 = _filter(download_dir, tmp_path / "a" / "dedup.parquet", tmp_path / "fb", "local:2")
    pd.testing.assert_frame_equal(f1, f2)
    # the decisions are real: duplicates, blanks and narrow originals are all dropped
    assert set(f1["reason"].dropna()) >= {"exact_duplicate", "pixel_std", "min_side"}
    assert list(f1["key"]) == sorted(f1["key"])


@pytest.mark.slow
def test_dask_local_cluster_equals_one_process(download_dir, tmp_path):
    one = _dedup(download_dir, tmp_path / "a", "local:1")
    assert _dedup(download_dir, tmp_path / "b", "dask:2") == one
    f1 = _filter(download_dir, tmp_path / "a" / "dedup.parquet", tmp_path / "fa", "local:1")
    f2 = _filter(download_dir, tmp_path / "a" / "dedup.parquet", tmp_path / "fb", "dask:2")
    pd.testing.assert_frame_equal(f1, f2)


@pytest.mark.slow
def test_ray_local_equals_one_process(download_dir, tmp_path):
    pytest.importorskip("ray")
    one = _dedup(download_dir, tmp_path / "a", "local:1")
    assert _dedup(download_dir, tmp_path / "b", "ray:2") == one


# ------------------------------------------------------------------ a worker killed mid-part

def _die_once(arg: tuple[str, int]) -> tuple[int, int]:
    """Kills its own worker process the first time it sees item 1 (a marker file remembers)."""
    marker, x = arg
    if x == 1 and not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(9)
    return x, x * x


def test_local_pool_reruns_the_part_of_a_killed_worker(tmp_path):
    items = [(str(tmp_path / "marker"), i) for i in range(6)]
    with E.executor("local:2") as ex:
        got = ex.map(_die_once, items)
    assert (tmp_path / "marker").read_text() == "died"  # the worker really died once
    assert got == [(i, i * i) for i in range(6)]


@pytest.mark.slow
def test_dask_reruns_the_part_of_a_killed_worker(tmp_path):
    items = [(str(tmp_path / "marker"), i) for i in range(6)]
    with E.executor("dask:2") as ex:
        got = ex.map(_die_once, items)
    assert (tmp_path / "marker").read_text() == "died"
    assert got == [(i, i * i) for i in range(6)]


# ------------------------------------------------------------------ bad runners, before work

def test_runner_specs_parse_and_bad_ones_are_refused():
    assert str(E.parse_runner("dask://10.0.0.5:8786")) == "dask://10.0.0.5:8786"
    assert str(E.parse_runner("tcp://h:1")) == "dask://h:1"
    assert E.parse_runner("local:3").workers == 3
    assert E.parse_runner("ray://head:10001").kind == "ray"
    for bad in ("spark", "dask://nohost", "local:0", "ray://h:99999", ""):
        with pytest.raises(E.RunnerError, match="runner"):
            E.parse_runner(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_named_before_work(tmp_path):
    port = _free_port()
    for scheme in ("dask", "ray"):
        with pytest.raises(E.RunnerError, match=f"127.0.0.1:{port}"):
            E.check_runner(f"{scheme}://127.0.0.1:{port}")


def test_curate_refuses_an_unreachable_runner_before_work(tmp_path):
    from imagegen import curate as C

    port = _free_port()
    cfg = C.CurateConfig(runner=f"dask://127.0.0.1:{port}")
    assert cfg.download.runner == cfg.filter.runner == f"dask://127.0.0.1:{port}"
    with pytest.raises(E.RunnerError, match="cannot reach"):
        C.check_preconditions(cfg, tmp_path / "root")
    assert not (tmp_path / "root" / "stages").exists()


def test_missing_runner_package_is_named(monkeypatch):
    monkeypatch.setitem(E._PACKAGES, "ray", ("imagegen_no_such_module", "ray"))
    with pytest.raises(E.RunnerError, match="needs the 'ray' package"):
        E.check_runner("ray")


def test_unwritable_shared_dir_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with E.executor("local:2") as ex:
        with pytest.raises(E.RunnerError, match=str(blocker / "root")):
            ex.probe_root(blocker / "root")
        ex.probe_root(tmp_path / "ok")  # a writable one passes
