"""Fault drills on real processes: run an ``imagegen`` command in its own process group, kill -9
the whole group at a chosen point, rerun, and compare bytes with an undisturbed run.

Used by ``tests/test_faults.py`` (assertions) and ``benchmarks/bench_faults.py`` (figures).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMAGEGEN = [sys.executable, "-m", "imagegen.cli"]

# A curate request small enough to run a dozen times on 2 shared cores (about a minute idle).
TINY_CURATE = [
    "name=tiny", "source.publish.n_images=90", "source.publish.stall_seconds=2.5",
    "reference_clip.n_train=200", "reference_clip.n_heldout=40", "reference_clip.steps=12",
    "reference_clip.warmup_steps=2", "reference_clip.vision_width=64", "reference_clip.text_width=64",
    "reference_clip.head_width=32", "reference_clip.vision_layers=1", "reference_clip.text_layers=1",
    "download.timeout=1.5", "download.processes_count=1", "shard.target_shard_size=20",
    "filter.clip_score.threshold=-1.0",
]
# curate prints "[<stage>] done|cached <id> -> <path>" after each stage, in this order
CURATE_STAGES = ["world", "reference_clip", "download", "dedup", "filter", "recaption", "shard"]

TINY_TRAIN = [
    "train.model.image_size=16",
    'train.model.net_overrides={"model_channels":16,"norm_groups":8,"head_channels":16}',
    "train.batch_size=8", "train.warmup_steps=0", "train.ckpt_every=4", "train.log_every=1",
    "train.epoch_batches=4", "train.shuffle_buffer=16", "train.sample_count=4", "train.sample_steps=2",
    "train.steps=24",
]


def curate_cmd(root: Path, *extra: str) -> list[str]:
    sets = [a for kv in (*TINY_CURATE, *extra) for a in ("--set", kv)]
    return [*IMAGEGEN, "curate", "--preset", "smoke", *sets, "--data-root", str(root), "--no-prefect", "--json"]


def train_cmd(root: Path, dataset: str, *extra: str) -> list[str]:
    sets = [a for kv in (*TINY_TRAIN, *extra) for a in ("--set", kv)]
    return [*IMAGEGEN, "train", "--preset", "smoke", "--dataset", dataset, *sets, "--data-root", str(root),
            "--no-prefect", "--json"]


@dataclass
class Outcome:
    returncode: int
    seconds: float
    stderr: str
    stdout: str
    killed: bool = False
    result: dict[str, Any] | None = None
    stage_lines: list[str] = field(default_factory=list)


def _env(env: dict[str, str] | None) -> dict[str, str]:
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return {**base, **(env or {})}


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800,
        kill_after_line: str | None = None, delay: float = 0.0) -> Outcome:
    """Run ``cmd`` in a new process group.  With ``kill_after_line``, SIGKILL the whole group
    ``delay`` seconds after the first stderr line starting with that text (the run may finish
    first; ``killed`` says whether the kill landed)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    out_chunks: list[str] = []
    reader = threading.Thread(target=lambda: out_chunks.append(p.stdout.read()), daemon=True)
    reader.start()
    err_lines: list[str] = []
    killed = False
    deadline = t0 + timeout
    for line in p.stderr:
        err_lines.append(line)
        if kill_after_line is not None and not killed and line.startswith(kill_after_line):
            time.sleep(delay)
            try:
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        if time.perf_counter() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            raise TimeoutError(f"{cmd} ran past {timeout} s")
    p.wait()
    reader.join(timeout=10)
    try:  # pool workers of a killed group may outlive the leader for a moment
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    stdout = "".join(out_chunks)
    res = None
    if p.returncode == 0 and stdout.strip():
        try:
            res = json.loads(stdout.strip().splitlines()[-1])
        except ValueError:
            res = None
    err = "".join(err_lines)
    return Outcome(p.returncode, time.perf_counter() - t0, err, stdout, killed and p.returncode != 0, res,
                   [ln.strip() for ln in err_lines if ln.startswith("[")])


def stage_status(outcome: Outcome) -> dict[str, str]:
    """``{stage: "done" | "cached"}`` from curate's progress lines."""
    got = {}
    for ln in outcome.stage_lines:
        name, _, rest = ln[1:].partition("] ")
        if name in CURATE_STAGES:
            got[name] = rest.split(" ", 1)[0]
    return got


def digests(folder: str | Path, exclude: tuple[str, ...] = ("card.json", "samples.png")) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex), minus ``exclude`` names
    (the card holds wall-clock timings, by design)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


def dataset_digests(path: str | Path) -> dict[str, str]:
    """Shards (tar, parquet, stats), manifest and accounting of a dataset folder."""
    d = Path(path)
    files = sorted([*(d / "shards").iterdir(), d / "manifest.parquet", d / "accounting.parquet"])
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def checkpoint_tensors(run_dir: str | Path) -> dict[str, str]:
    """sha256 of each tensor of the run's newest checkpoint (model, EMA, optimizer, RNG)."""
    from safetensors.torch import load_file

    from imagegen.train.checkpoint import TENSORS, latest_checkpoint

    ck = latest_checkpoint(Path(run_dir))
    tensors = load_file(str(ck / TENSORS))
    return {k: hashlib.sha256(v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
                              ).hexdigest() for k, v in sorted(tensors.items())}


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders under ``root`` (there must be none after a finished run)."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if ".tmp-" in p.name or p.name.endswith(".part"))


def random_delay(rng: random.Random, upto: float) -> float:
    return round(rng.uniform(0, upto), 2)
