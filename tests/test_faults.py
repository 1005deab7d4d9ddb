"""Fault injection with real processes: same request, same bytes, however the run went.

Each test runs ``imagegen`` as a subprocess (its own process group), kills it where the test says
and reruns; the reference is an uninterrupted run of the same request.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGEGEN = [sys.executable, "-m", "imagegen.cli"]

TINY = [
    "name=tiny", "source.publish.n_images=90", "source.publish.stall_seconds=2.5",
    "reference_clip.n_train=200", "reference_clip.n_heldout=40", "reference_clip.steps=12",
    "reference_clip.warmup_steps=2", "reference_clip.vision_width=64", "reference_clip.text_width=64",
    "reference_clip.head_width=32", "reference_clip.vision_layers=1", "reference_clip.text_layers=1",
    "download.timeout=1.5", "download.processes_count=1", "shard.target_shard_size=20",
    "filter.clip_score.threshold=-1.0",
]


def curate_cmd(root: Path, *extra: str) -> list[str]:
    sets = [a for kv in (*TINY, *extra) for a in ("--set", kv)]
    return [*IMAGEGEN, "curate", "--preset", "smoke", *sets, "--data-root", str(root), "--no-prefect", "--json"]


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> dict:
    p = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def shard_digests(dataset_path: str | Path) -> dict[str, str]:
    """sha256 of every shard file (tar, parquet, stats) and of the manifest/accounting tables."""
    d = Path(dataset_path)
    files = sorted([*(d / "shards").iterdir(), d / "manifest.parquet", d / "accounting.parquet"])
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny curate: the bytes every other run must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    out = run(curate_cmd(root), env={"OMP_NUM_THREADS": "1"})
    return root, out, shard_digests(out["path"])


def _dataset_path(out: dict) -> str:
    return out["path"]


@pytest.mark.slow
def test_two_clean_runs_in_separate_roots_give_identical_shards(reference, tmp_path):
    """Finding 1 and 2: another data root (so another server port) and another default thread
    count (OMP_NUM_THREADS=2 plus a busy core) give the same dataset id and the same bytes."""
    root, out, digests = reference
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        again = run(curate_cmd(tmp_path), env={"OMP_NUM_THREADS": "2"})
    finally:
        burner.kill()
        burner.wait()
    assert _dataset_path(again) != _dataset_path(out)
    assert Path(_dataset_path(again)).name == Path(_dataset_path(out)).name
    assert shard_digests(_dataset_path(again)) == digests


@pytest.mark.parametrize("args, says", [
    (["train", "--preset", "smoke", "--set", "train.family=os:system"], "not a subclass of models.base.Family"),
    (["curate", "--url-list", "{dup}"], "--set download.on_duplicate_urls=skip"),
    (["curate", "--url-list", "{bad}"], "line 2"),
    (["curate", "--url-list", "{ok}"], "filter.clip_score.model"),
])
def test_bad_input_is_exit_2_with_a_message_and_leaves_no_data_root(tmp_path, args, says):
    """Finding 7 and 10: refusals are exit 2 and one message, never a traceback, and a refused
    request leaves no data root behind."""
    lists = {"dup": '{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}\n' * 2,
             "bad": '{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}\n{"url": "http://x", caption\n',
             "ok": '{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}\n'}
    for name, text in lists.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    args = [a.format(**{n: tmp_path / f"{n}.jsonl" for n in lists}) for a in args]
    root = tmp_path / "root"
    p = subprocess.run([*IMAGEGEN, *args, "--data-root", str(root), "--no-prefect"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    assert says in p.stderr, p.stderr[-2000:]
    assert not root.exists()
