"""Part-parallel map steps on the runners (local pool, a real Dask LocalCluster, Ray local):
the same bytes as one process, a killed worker's part run again, clear errors before work."""

from __future__ import annotations

import importlib.util
import io
import os
import re
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


@pytest.mark.slow
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


def test_submitted_parts_come_back_and_a_killed_workers_part_is_resubmitted(tmp_path):
    """``submit`` (parts handed over one at a time, as the download's overlapped decode does): every
    result comes back, the part whose worker died is run again in a new pool, and an error is raised by
    its handle's result()."""
    items = [(str(tmp_path / "marker"), i) for i in range(6)]
    with E.executor("local:2") as ex:
        assert ex.supports_submit
        ex.warm()
        handles = [ex.submit(_die_once, x) for x in items]
        assert [h.result() for h in handles] == [(i, i * i) for i in range(6)]
        with pytest.raises(TypeError):
            ex.submit(_die_once, None).result()
    assert (tmp_path / "marker").read_text() == "died"
    with E.executor("local:1") as ex:  # in this process: run at submit
        assert ex.in_process and ex.submit(_die_once, ("-", 3)).result() == (3, 9)


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


def test_distributor_problems_are_named_before_work(tmp_path, monkeypatch):
    """img2dataset's distributors: a malformed or unreachable cluster address, a missing package, pyspark
    without a Java runtime are refused by curate's preconditions (the CLI's exit 2) before any stage runs."""
    from pydantic import ValidationError

    from imagegen import curate as C
    from imagegen.stages.download import DownloadConfig

    with pytest.raises(ValidationError, match="distributor_address.*only for distributor"):
        DownloadConfig(distributor_address="auto")
    with pytest.raises(ValidationError, match="not a pyspark address"):
        DownloadConfig(distributor="pyspark", distributor_address="ray://h:10001")
    port = _free_port()
    for dist, addr, what in (("ray", f"127.0.0.1:{port}", "Ray head"), ("ray", f"ray://127.0.0.1:{port}", "Ray head"),
                             ("pyspark", f"spark://127.0.0.1:{port}", "Spark master")):
        if importlib.util.find_spec(dist) is None:
            continue
        cfg = C.CurateConfig(download=DownloadConfig(distributor=dist, distributor_address=addr))
        with pytest.raises(E.RunnerError, match=f"cannot reach the {what} at {re.escape(addr)}"):
            C.check_preconditions(cfg, tmp_path / "root")
        assert not (tmp_path / "root").exists()  # nothing was started or written
    monkeypatch.setitem(E._DIST_PACKAGES, "ray", ("imagegen_no_such_module", "ray"))
    with pytest.raises(E.RunnerError, match="distributor='ray' needs the 'ray' package"):
        E.check_distributor("ray")
    # pyspark without Java: no java on PATH, no JAVA_HOME (a JAVA_HOME without bin/java is named)
    if importlib.util.find_spec("pyspark") is not None:
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
        monkeypatch.delenv("JAVA_HOME", raising=False)
        cfg = C.CurateConfig(download=DownloadConfig(distributor="pyspark"))
        with pytest.raises(E.RunnerError, match="needs a Java runtime.*apt-get install -y default-jre-headless"):
            C.check_preconditions(cfg, tmp_path / "root")
        monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jre"))
        with pytest.raises(E.RunnerError, match=f"JAVA_HOME={re.escape(str(tmp_path / 'no-jre'))} has no bin/java"):
            E.check_distributor("pyspark")


def test_pyspark_without_java_exits_2_from_the_cli(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pyspark")
    from imagegen import cli

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    rc = cli.main(["curate", "--preset", "smoke", "--no-prefect", "--data-root", str(tmp_path / "root"),
                   "--set", "download.distributor=pyspark"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs a Java runtime" in err and "default-jre-headless" in err and "Traceback" not in err
    assert not (tmp_path / "root").exists()


def test_unwritable_shared_dir_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with E.executor("local:2") as ex:
        with pytest.raises(E.RunnerError, match=str(blocker / "root")):
            ex.probe_root(blocker / "root")
        ex.probe_root(tmp_path / "ok")  # a writable one passes


# ------------------------------------------------------------------ end to end on every runner

_E2E = [
    "name=parts", "source.publish.n_images=110", "source.publish.stall_seconds=2.5",
    "reference_clip.n_train=200", "reference_clip.n_heldout=40", "reference_clip.steps=12",
    "reference_clip.warmup_steps=2", "reference_clip.vision_width=64", "reference_clip.text_width=64",
    "reference_clip.head_width=32", "reference_clip.vision_layers=1", "reference_clip.text_layers=1",
    "download.timeout=1.5", "download.processes_count=1", "shard.target_shard_size=20",
    "filter.clip_score.mode=top_fraction", "filter.clip_score.top_fraction=0.8",
    "download.number_sample_per_shard=30",  # several download parts
]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference: every map step in this process (runner local:1), on a fixed world port (URLs are in
    the samples' metadata, so two runs compare byte for byte only on the same port)."""
    from imagegen import curate as C
    from imagegen.presets import CURATE_PRESETS, build_config

    port = _free_port()
    root = tmp_path_factory.mktemp("one")
    cfg = build_config(C.CurateConfig, CURATE_PRESETS, "smoke", [*_E2E, f"source.world_port={port}", "runner=local:1"])
    return root, port, C.curate(cfg, root)


def _fingerprint(ref) -> dict:
    card = ref.card
    return {"id": ref.id, "shards": card["shards"],
            "accounting": pd.read_parquet(ref.path / "accounting.parquet"),
            "manifest": pd.read_parquet(ref.path / "manifest.parquet")}


def _java_missing() -> bool:
    return E.java_binary() is None


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("runner,distributor", [
    ("local:2", "pyspark"),  # img2dataset's distributors fetch (Spark local / Ray local), the runner maps parts
    ("dask:2", "multiprocessing"),
    ("ray:2", "ray"),
])
def test_part_parallel_curate_equals_one_process(one_process_run, tmp_path, runner, distributor, caplog):
    """The reference fetched with img2dataset's multiprocessing distributor and ran every map step in one
    process; here the map steps run on another runner and the fetch on another distributor: the same
    dataset id (the distributor and the runner are execution knobs), shard bytes, accounting, manifest.
    A dask/ray runner is started once for the whole curate (every stage's map steps) and closed at its end."""
    import logging
    import shutil

    from imagegen import curate as C
    from imagegen.presets import CURATE_PRESETS, build_config

    if "ray" in (runner.split(":")[0], distributor):
        pytest.importorskip("ray")
    if distributor == "pyspark":
        pytest.importorskip("pyspark")
        if _java_missing():
            pytest.skip("download.distributor=pyspark needs a Java runtime: " + E.JAVA_HINT)
    root1, port, ref1 = one_process_run
    assert ref1.card["counts"]["download"]["parts"] >= 3
    assert ref1.card["counts"]["download"]["distributor"]["kind"] == "multiprocessing"
    root = tmp_path / "root"
    # the world and its reference CLIP are content-addressed and independent of the runner: reuse them
    shutil.copytree(root1 / "models", root / "models")
    shutil.copytree(root1 / "stages" / "world", root / "stages" / "world")
    cfg = build_config(C.CurateConfig, CURATE_PRESETS, "smoke", [*_E2E, f"source.world_port={port}", f"runner={runner}",
                                                                   f"download.distributor={distributor}"])
    log: list[tuple[str, bool]] = []
    caplog.set_level(logging.INFO, logger="imagegen.executors")
    ref = C.curate(cfg, root, progress=lambda st, r: log.append((st, r.cached)))
    assert dict(log)["download"] is False and dict(log)["filter"] is False  # really recomputed here
    engine_log = [r.getMessage() for r in caplog.records if r.name == "imagegen.executors"]
    if runner.startswith("dask"):
        assert len([m for m in engine_log if "started the Dask scheduler" in m]) == 1, engine_log
        assert len([m for m in engine_log if "closed the Dask cluster" in m]) == 1, engine_log
    if runner.startswith("ray"):
        assert len([m for m in engine_log if "started Ray" in m]) == 1, engine_log
        assert len([m for m in engine_log if "shut Ray" in m]) == 1, engine_log
    engine = ref.card["counts"]["download"]["distributor"]  # what really fetched: an engine started for it
    assert engine["kind"] == distributor
    if distributor == "ray":
        assert engine["started_here"] and engine["cpus"] == 1 and engine["nodes"] == 1
    if distributor == "pyspark":
        assert engine["started_here"] and engine["master"] == "local[1]"
    a, b = _fingerprint(ref1), _fingerprint(ref)
    assert a["id"] == b["id"]  # same dataset id
    assert a["shards"] == b["shards"]  # same shard bytes (sha256 per shard)
    for what in ("accounting", "manifest"):  # same keys and decisions (NaN equal to NaN here)
        pd.testing.assert_frame_equal(a[what], b[what])


# ------------------------------------------------------------------ memory does not grow with parts

_MEM_SCRIPT = r"""
import io, json, sys
from pathlib import Path
import numpy as np, pandas as pd, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
from imagegen.hashing import bytes_sha256
from imagegen.stages.dedup import DedupConfig, run_dedup
from imagegen.stages.filter import FilterConfig, run_filter
from imagegen.stages import shard as S
from imagegen.stages import shard_parts as SP

import gc, os, threading, time
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20

class Peak:  # this process's RSS sampled every 2 ms: the peak of one stage over its starting RSS
    def __init__(self):
        self.peak = rss_mb()
        threading.Thread(target=self._run, daemon=True).start()
    def _run(self):
        while True:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)
    def start(self):
        gc.collect()
        self.before = self.peak = rss_mb()
    def growth(self):
        return self.peak - self.before

n_parts, per_part, d = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
(d / "images").mkdir(parents=True)
rng = np.random.default_rng(0)
rows = []
for p in range(n_parts):  # noise pictures: ~100 kB each as JPEG, ~200 kB decoded
    keys, blobs = [], []
    for i in range(per_part):
        rid = p * per_part + i
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        keys.append(f"{rid:09d}"); blobs.append(buf.getvalue()); rows.append(rid)
    pq.write_table(pa.table({"key": keys, "row_id": pa.array([int(k) for k in keys], pa.int64()), "image": blobs,
                             "ext": ["jpg"] * per_part, "sha256": [bytes_sha256(b) for b in blobs],
                             "caption": ["noise"] * per_part}), d / "images" / f"part-{p:05d}.parquet", row_group_size=50)
    del keys, blobs
pd.DataFrame({"row_id": rows, "key": [f"{r:09d}" for r in rows], "status": "success", "original_width": 256,
              "original_height": 256, "url": "http://x.invalid/", "sha256": "s", "source_sha256": "s"}
             ).to_parquet(d / "ledger.parquet", index=False)
del rows
P = Peak()
out = {}
P.start()
run_dedup(d / "images", d / "ledger.parquet", DedupConfig(), d / "dedup.parquet", runner="local:1")
out["dedup"] = P.growth()
P.start()
run_filter(d, d / "dedup.parquet", FilterConfig(clip_score=None, min_entropy=1.0), d / "filter.parquet", runner="local:1")
out["filter"] = P.growth()
ff, dd, led = (pd.read_parquet(d / f) for f in ("filter.parquet", "dedup.parquet", "ledger.parquet"))
kept = ff.loc[ff["keep"], "key"].tolist()
cc = pd.DataFrame({"key": kept, "original_caption": "noise", "generated_caption": None, "caption_source": "original",
                   "captioner": None, "captioner_model": None, "caption": "noise"})
table, scores = SP.metadata_table(led, dd, ff, cc, kept)
del ff, dd, led, cc
P.start()
SP.write_dataset_shards(d / "images", table, scores, S.ShardConfig(target_shard_size=per_part), d / "shards",
                        d / "work", runner="local:1")
out["shard"] = P.growth()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_stage_memory_does_not_grow_with_the_number_of_parts(tmp_path):
    """dedup, filter and the shard writer over 3 and 12 parts of 100 noise images (~10 MB of JPEG, ~20 MB
    decoded per part), each stage in one process: its peak RSS over the RSS it started with (sampled every
    2 ms) stays within 2x with 4x the parts, where holding the dataset would cost 4x. Measured 2026-12-03 in
    four runs (MB, 3 -> 12 parts): dedup 23-34 -> 38-53, filter 61-91 -> 49-79, shard 36-40 -> 31-63 (the
    allocator's noise is ~+-15 MB); dedup was 35 -> 90 before its hashing went batch by batch (a chunk spanning
    two batches kept both alive and the heap grew part after part). 2026-12-04, seven runs: shard 1-22 at 3
    parts but 59-80 at 12, 41/14 at 6 -> 68/63 at 24, 64/80 at 12 -> 71/58 at 24 (MALLOC_ARENA_MAX=1 alike):
    a plateau reached by ~6 parts, not growth with N (one part's images are held two or three times while it
    is routed, ~30 MB, plus the allocator's cache), so the floor is that working set, 50 MB; holding the
    dataset would add >= 90 MB of JPEG bytes alone at 12 parts."""
    import json
    import subprocess
    import sys

    def measure(n_parts: int) -> dict:
        out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(n_parts), "100", str(tmp_path / f"p{n_parts}")],
                             capture_output=True, text=True, check=True, timeout=900)
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, big = measure(3), measure(12)
    print("peak RSS growth over the stage's start, MB, 3 -> 12 parts:",
          {st: (round(small[st]), round(big[st])) for st in ("dedup", "filter", "shard")})
    # 4x the parts (4x the data): each stage's peak over its starting RSS stays within 2x (50 MB floor: one part's
    # working set and the allocator's cache, see above)
    for stage in ("dedup", "filter", "shard"):
        assert big[stage] <= 2.0 * max(small[stage], 50.0), (stage, small, big)


def _tiny_download(d: Path, n: int, per_part: int = 1000) -> None:
    """n small world-sized images (32 px JPEG, ~1 kB) in parts of per_part rows, and their ledger."""
    from PIL import ImageDraw

    (d / "images").mkdir(parents=True)
    rng = np.random.default_rng(n)
    for p in range(0, n, per_part):
        keys, blobs = [], []
        for rid in range(p, min(n, p + per_part)):
            im = Image.new("RGB", (32, 32), tuple(int(x) for x in rng.integers(0, 256, 3)))
            x, y = (int(v) for v in rng.integers(0, 20, 2))
            ImageDraw.Draw(im).ellipse([x, y, x + 12, y + 12], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=95)
            keys.append(f"{rid:09d}")
            blobs.append(buf.getvalue())
        pq.write_table(pa.table({"key": keys, "row_id": pa.array([int(k) for k in keys], pa.int64()), "image": blobs,
                                 "ext": ["jpg"] * len(keys), "sha256": [bytes_sha256(b) for b in blobs]}),
                       d / "images" / f"part-{p // per_part:05d}.parquet")
    pd.DataFrame({"row_id": np.arange(n), "key": [f"{r:09d}" for r in range(n)], "status": "success",
                  "original_width": 32, "original_height": 32}).to_parquet(d / "ledger.parquet", index=False)


@pytest.mark.slow
def test_dedup_holds_no_python_object_per_row(tmp_path):
    """With many small images the per-row cost is what counts: dedup's traced heap (Python objects and numpy
    arrays; Arrow's own pool is not traced) grows by under 700 bytes a row from 1k to 4k rows: the compact
    columns (hashes, labels, ranks, the MIH tables as numpy, ~450 B a row measured; keys and sha256 as Arrow
    arrays). Python lists of key, sha256 and hex strings per column, as before, cost ~1,450 B a row here."""
    import tracemalloc

    peaks = {}
    for n in (1000, 4000):
        d = tmp_path / str(n)
        _tiny_download(d, n)
        tracemalloc.start()
        try:
            counts = run_dedup(d / "images", d / "ledger.parquet", DedupConfig(hash_type="ahash"),
                               d / "dedup.parquet", runner="local:1")
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert counts["images"] == n
    per_row = (peaks[4000] - peaks[1000]) / 3000
    assert per_row < 700, ({n: round(v / 2**20, 2) for n, v in peaks.items()}, round(per_row))


# ------------------------------------------------------------------ SemDeDup as an option of the dedup stage

@pytest.mark.slow
def test_semantic_dedup_in_the_dedup_stage(download_dir, tmp_path):
    """Embeddings are a map step per part; SemDeDup runs over the perceptual representatives only and
    marks exactly what the in-memory semdedup() marks on the same embeddings; the filter drops them
    as 'semantic_duplicate'; a 2-process pool gives the same bytes."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _helpers import tiny_random_clip

    from imagegen.clip import encode_images, load_clip
    from imagegen.semdedup import SemDedupConfig, semdedup

    spec = tiny_random_clip(tmp_path / "clip")
    sem = SemDedupConfig(threshold=0.999, n_clusters=2, keep="priority")
    cfg = DedupConfig(radius=4, semantic=sem, semantic_model="mine")
    outs = {}
    for runner in ("local:1", "local:2"):
        out = tmp_path / runner.replace(":", "")
        counts = run_dedup(download_dir / "images", download_dir / "ledger.parquet", cfg, out / "dedup.parquet",
                           runner=runner, resolve_model=lambda s: spec if s == "mine" else s)
        outs[runner] = (out / "dedup.parquet").read_bytes()
    assert outs["local:1"] == outs["local:2"]
    df = pd.read_parquet(tmp_path / "local1" / "dedup.parquet")
    _dedup(download_dir, tmp_path / "plain", "local:1")
    base = pd.read_parquet(tmp_path / "plain" / "dedup.parquet")
    reps = base.loc[base["is_representative"], "key"].tolist()
    # the reference: the same CLIP on the representatives' images, in memory
    imgs = {}
    for p in sorted((download_dir / "images").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["key", "image"]).to_pydict()
        imgs.update(zip(t["key"], t["image"]))
    emb = encode_images(load_clip(spec), [Image.open(io.BytesIO(imgs[k])).convert("RGB") for k in reps])
    led = pd.read_parquet(download_dir / "ledger.parquet").set_index("key")
    area = (led.loc[reps, "original_width"] * led.loc[reps, "original_height"]).to_numpy()
    want, _ = semdedup(emb, reps, sem, priority=area)
    want_dups = set(want.to_pandas().query("not is_representative")["key"])
    got_dups = set(df.loc[df["dup_kind"] == "semantic", "key"])
    assert want_dups and got_dups == want_dups  # something to find, and exactly that
    assert counts["semantic_duplicates"] == len(want_dups)
    # perceptual marks are untouched, semantic ones only among perceptual representatives
    assert (df.loc[df["dup_kind"].isin(["exact", "near"]), "key"].tolist()
            == base.loc[~base["is_representative"], "key"].tolist())
    ff = _filter(download_dir, tmp_path / "local1" / "dedup.parquet", tmp_path / "fs", "local:1")
    assert set(ff.loc[ff["reason"] == "semantic_duplicate", "key"]) == want_dups


# ------------------------------------------------------------------ map steps as Prefect tasks (tasks/curate_map.py)

def _task_runs(name: str) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    async def go():
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))

    return asyncio.run(go())


@pytest.mark.slow
def test_map_steps_run_as_prefect_tasks_on_dask_and_rerun_from_cache(prefect_server, download_dir, tmp_path):
    """Under a flow with prefect-dask's DaskTaskRunner (a real 2-worker LocalCluster), dedup hashing and
    filter scoring run as one Prefect task per part (never images: parameters are paths and ledger rows),
    with the same bytes as one process; a rerun serves every part's hashes from Prefect's cache."""
    from prefect import flow

    from tasks.curate_map import prefect_mapper, task_runner_for

    @flow(name="map-steps-test")
    def steps(out: str, runner: str) -> None:
        with E.mapped_by(prefect_mapper(runner, tmp_path / "root")):
            _dedup(download_dir, Path(out), runner)
            cfg = FilterConfig(clip_score=None, min_side=49)
            run_filter(download_dir, Path(out) / "dedup.parquet", cfg, Path(out) / "filter.parquet",
                       runner=runner, part_cache=tmp_path / "root" / "parts" / "filter" / "t",
                       part_key=lambda p: Path(p).stem)

    one = _dedup(download_dir, tmp_path / "one", "local:1")
    f1 = _filter(download_dir, tmp_path / "one" / "dedup.parquet", tmp_path / "one", "local:1")
    before = {r.id for r in _task_runs("dedup-hash")}
    steps.with_options(task_runner=task_runner_for("dask:2"))(str(tmp_path / "a"), "dask:2")
    assert (tmp_path / "a" / "dedup.parquet").read_bytes() == one
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "filter.parquet"), f1)
    runs = [r for r in _task_runs("dedup-hash") if r.id not in before]
    assert len(runs) == N_PARTS and all(r.state.is_completed() for r in runs)
    assert len([r for r in _task_runs("filter-score")]) >= N_PARTS
    assert all(r.state.name == "Completed" for r in runs)  # computed, not from a cache
    # the rerun: every part's hashes come from the cache (content keys), the bytes are the same
    seen = {r.id for r in _task_runs("dedup-hash")}
    steps.with_options(task_runner=task_runner_for("dask:2"))(str(tmp_path / "b"), "dask:2")
    assert (tmp_path / "b" / "dedup.parquet").read_bytes() == one
    again = [r for r in _task_runs("dedup-hash") if r.id not in seen]
    assert len(again) == N_PARTS and {r.state.name for r in again} == {"Cached"}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_curate_flow_maps_parts_as_prefect_tasks_on_dask(prefect_server, one_process_run, tmp_path):
    """The curate flow on --runner dask:2 (the curate-stages subflow on prefect-dask's DaskTaskRunner, a
    real 2-worker LocalCluster): every part of download, dedup and filter is a Prefect task run, the
    CLIP-backed filter parts carry the gpu tag (hashing does not), each planned shard is written by a task
    of its own, and the dataset id and shard bytes equal the library's single-process run."""
    import shutil

    from flows.curate import curate_flow
    from imagegen import curate as C
    from imagegen.presets import CURATE_PRESETS, build_config

    root1, port, ref1 = one_process_run
    parts = ref1.card["counts"]["download"]["parts"]
    assert parts >= 3
    root = tmp_path / "root"
    shutil.copytree(root1 / "models", root / "models")
    shutil.copytree(root1 / "stages" / "world", root / "stages" / "world")
    cfg = build_config(C.CurateConfig, CURATE_PRESETS, "smoke", [*_E2E, f"source.world_port={port}", "runner=dask:2"])
    seen = {r.id for name in ("download-decode", "dedup-hash", "filter-score", "shard-route", "shard-write")
            for r in _task_runs(name)}
    curate_flow(config=cfg, data_root=str(root))
    from imagegen.registry import get_dataset

    ref = get_dataset(root, "parts")
    a, b = _fingerprint(ref1), _fingerprint(ref)
    assert a["id"] == b["id"] and a["shards"] == b["shards"]
    for what in ("accounting", "manifest"):
        pd.testing.assert_frame_equal(a[what], b[what])
    for name, gpu in (("download-decode", False), ("dedup-hash", False), ("filter-score", True)):
        runs = [r for r in _task_runs(name) if r.id not in seen]
        assert len(runs) == parts and all(r.state.is_completed() for r in runs), name
        assert all(("gpu" in r.tags) == gpu for r in runs), name
    # the shard stage: one task per download part routes its kept images, one task per planned shard writes it
    planned = -(-ref.card["counts"]["shard"]["samples"] // 20)
    for name, n in (("shard-route", parts), ("shard-write", planned)):
        runs = [r for r in _task_runs(name) if r.id not in seen]
        assert len(runs) == n and all(r.state.is_completed() for r in runs), (name, len(runs), n)


class FlakyDownloader:
    """img2dataset's subjob contract, ``(shard id, shard file) -> (status, same row)``: each call leaves a
    file per attempt, and the first attempt at ``fail`` returns False, as img2dataset's ``Downloader``
    does when its ``download_shard`` raised.  (A Ray task runs it in a worker process: the attempts are
    counted on disk.)"""

    def __init__(self, marks: str, fail: int) -> None:
        self.marks, self.fail = marks, fail

    def __call__(self, row: tuple[int, str]) -> tuple[bool, tuple[int, str]]:
        shard_id, _ = row
        n = len(list(Path(self.marks).glob(f"{shard_id}-*")))
        (Path(self.marks) / f"{shard_id}-{n}").write_text(str(os.getpid()))
        return (not (shard_id == self.fail and n == 0), row)


def _attempts(marks: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in marks.iterdir():
        out[int(p.name.split("-")[0])] = out.get(int(p.name.split("-")[0]), 0) + 1
    return out


@pytest.mark.slow
def test_ray_distributor_retries_a_failed_subjob(tmp_path):
    """img2dataset 1.47's ``ray_distributor`` drops a subjob whose downloader returned False (its
    multiprocessing and pyspark distributors retry it ``max_shard_retry`` times).  Inside the download's
    ``distributor_session`` (real local Ray) img2dataset's ``ray`` name is ours: the failed subjob is run
    again, ``max_shard_retry=0`` still means no retry, and img2dataset's own is back afterwards."""
    pytest.importorskip("ray")
    import importlib

    i2d_dist = importlib.import_module("img2dataset.distributor")
    i2d_main = importlib.import_module("img2dataset.main")  # the package's ``main`` attribute is a function

    from imagegen.stages.download import DownloadConfig, distributor_session

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    try:
        _ray_retry_case(tmp_path, i2d_dist, i2d_main, distributor_session, DownloadConfig)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _ray_retry_case(tmp_path, i2d_dist, i2d_main, distributor_session, DownloadConfig) -> None:
    own = i2d_main.ray_distributor
    shards = [(i, f"/nowhere/{i}.feather") for i in range(4)]
    with distributor_session(DownloadConfig(distributor="ray", processes_count=1)) as info:
        assert info["kind"] == "ray" and info["started_here"]
        assert i2d_main.ray_distributor is E.ray_distributor
        for name, dist, retries, want in (("img2dataset's", i2d_dist.ray_distributor, 1, {0: 1, 1: 1, 2: 1, 3: 1}),
                                         ("ours", i2d_main.ray_distributor, 1, {0: 1, 1: 1, 2: 2, 3: 1}),
                                         ("ours, no retry", i2d_main.ray_distributor, 0, {0: 1, 1: 1, 2: 1, 3: 1})):
            marks = tmp_path / name.replace(" ", "_").replace(",", "").replace("'", "")
            marks.mkdir()
            dist(1, FlakyDownloader(str(marks), fail=2), iter(shards), 1, retries)
            assert _attempts(marks) == want, name
    assert i2d_main.ray_distributor is own
