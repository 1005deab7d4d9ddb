"""Evaluation sets generated over 2 CPU processes with torchrun (gloo): each rank a disjoint range
of batches, one gather, byte-identical images and the same metrics as one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import eval_world_root, tiny_text_run
from imagegen.evaluate.run import evaluate, rank_batches

pytestmark = pytest.mark.slow  # a tiny training + a 2-process torchrun launch

ROOT = Path(__file__).resolve().parents[1]


def test_rank_batches_are_disjoint_and_cover_the_set():
    for n, bs, world in ((10, 4, 2), (100, 7, 3), (5, 8, 4)):
        parts = [rank_batches(n, bs, r, world) for r in range(world)]
        flat = [s for p in parts for s in p]
        assert flat == list(range(0, n, bs)) and len(set(flat)) == len(flat)


def test_two_processes_generate_what_one_does(tmp_path, one_torch_thread):
    root = tmp_path / "root"
    eval_world_root(root, n=32, per_shard=16)
    run_id = tiny_text_run(root, steps=2)
    req = {"run": run_id, "metrics": ["fid", "clipscore"], "n_samples": 10, "batch_size": 4, "steps": 2,
           "n_resamples": 10, "kid_subsets": 2, "kid_subset_size": 4, "device": "cpu"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "imagegen.evaluate.distributed", "--request", json.dumps(req),
           "--data-root", str(root), "--backend", "gloo"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    folder = Path(two["path"])
    info = json.loads((folder / "samples" / "generate.json").read_text())
    assert info["world_size"] == 2
    saved = {f.name: f.read_bytes() for f in sorted((folder / "samples").glob("*.png"))}
    assert len(saved) == 10
    shutil.rmtree(folder)  # the same id: one process regenerates it from scratch
    one = evaluate(req, root)
    assert one["eval_id"] == two["eval_id"] and not one["reused"]
    again = {f.name: f.read_bytes() for f in sorted((Path(one["path"]) / "samples").glob("*.png"))}
    assert again == saved, "images differ between 2 processes and 1"
    assert one["metrics"] == pytest.approx(two["metrics"])
