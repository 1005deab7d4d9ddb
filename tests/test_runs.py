"""Training runs (imagegen/train/runs.py): identity, reuse, resume, completion from the dataset,
and requests refused before any training step."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from _helpers import register_world_dataset
from imagegen.presets import build_config, deep_merge
from imagegen.registry import RegistryError
from imagegen.train.runs import (TRAIN_PRESETS, RunBusy, RunError, TrainRequest, get_run, list_runs, prepare,
                                 train_run)

NET = {"net": "unet", "net_size": "tiny", "image_size": 16,
       "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("runs-root")
    register_world_dataset(r)
    return r




def request(**train: Any) -> dict[str, Any]:
    base = {"family": "flow", "model": {**NET, "conditioning": "class"}, "steps": 6, "batch_size": 8,
            "lr": 1e-3, "ckpt_every": 3, "epoch_batches": 4, "shuffle_buffer": 16, "sample_count": 5,
            "sample_steps": 2, "label_keywords": ["circle", "square", "triangle", "star", "cross"]}
    req = {"dataset": "world-tiny", "train": deep_merge(base, train)}
    model = req["train"]["model"]
    req["train"]["model"] = {k: v for k, v in model.items() if v is not None}  # None: leave the field out
    return req


def test_rerun_reuses_and_a_stopped_run_resumes(root):
    first = train_run(request(), root, stop_after=4)  # as if killed after step 4 (checkpoint at 3)
    assert not first["finished"] and first["step"] == 4
    card = json.loads((Path(first["run_dir"]) / "card.json").read_text())
    assert card["status"] == "stopped"
    second = train_run(request(), root)
    assert second["run_id"] == first["run_id"] and second["start_step"] == 3 and second["finished"]
    metrics = (Path(second["run_dir"]) / "metrics.parquet").read_bytes()
    third = train_run(request(log_every=2, sample_count=3), root)  # logging/sampling knobs: same run
    assert third["reused"] and third["run_id"] == first["run_id"]
    assert (Path(third["run_dir"]) / "metrics.parquet").read_bytes() == metrics
    other = prepare(TrainRequest(**request(lr=2e-3)), root)
    assert other.run_id != first["run_id"], "a trajectory-changing field makes another run"
    ref = get_run(root, first["run_id"][:8])
    assert ref.summary()["status"] == "finished" and ref.summary()["step"] == 6
    assert ref.checkpoint is not None and ref.checkpoint.name == "step_00000006"
    assert [r.id for r in list_runs(root)] == [first["run_id"]]
    df = pd.read_parquet(Path(second["run_dir"]) / "metrics.parquet")
    assert df["step"].tolist() == [1, 2, 3, 4, 5, 6]


def test_config_is_completed_from_the_dataset(root):
    prep = prepare(TrainRequest(**request(label_keywords=[], label_field="kind", model={"num_classes": None})), root)
    kinds = sorted(pd.read_parquet(prep.dataset.path / "manifest.parquet")["kind"].unique())
    assert prep.config.classes == tuple(kinds) and prep.config.model["num_classes"] == len(kinds)
    text = prepare(TrainRequest(**{"dataset": "world-tiny", "train": {
        "family": "ddpm", "model": {**NET}, "steps": 2, "batch_size": 4}}), root)
    assert text.config.sample_prompts == ()


def test_the_same_run_cannot_train_twice_at_once(root):
    prep = prepare(TrainRequest(**request(seed=7)), root)
    prep.run_dir.mkdir(parents=True)
    with open(prep.run_dir / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RunBusy, match=f"run {prep.run_id} is being trained by another process"):
            train_run(request(seed=7), root)


@pytest.mark.parametrize("change,error,match", [
    ({"dataset": "no-such-data"}, RegistryError, "no dataset 'no-such-data' in the registry"),
    ({"train": {"label_keywords": ["circle", "square"]}}, RunError, "contain none of them"),
    ({"train": {"label_keywords": [], "label_field": "colour", "model": {"num_classes": None}}}, RunError,
     "label_field='colour' is not a field of dataset world-tiny"),
    ({"train": {"batch_size": 64}}, RunError, "has 48 samples; a micro-batch of 64"),
    ({"train": {"label_keywords": [], "model": {"conditioning": "text", "text_encoder": "world"}}}, RunError,
     "was not curated from the world"),
    ({"nproc": 2}, RunError, "nproc=2 must divide micro_batches=1"),
])
def test_bad_requests_are_refused_before_training(root, change, error, match):
    req = deep_merge(request(), {k: v for k, v in change.items() if k != "train"})
    if "train" in change:
        req = {**req, "train": request(**change["train"])["train"]}
    before = set((root / "runs").glob("*")) if (root / "runs").is_dir() else set()
    with pytest.raises(error, match=match):
        train_run(req, root)
    after = set((root / "runs").glob("*")) if (root / "runs").is_dir() else set()
    assert after == before, "a refused request left a run folder"


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_presets_are_valid_requests(preset):
    req = build_config(TrainRequest, TRAIN_PRESETS, preset)
    assert req.train.steps >= 100
    for family in ("ddpm", "edm", "flow"):
        build_config(TrainRequest, TRAIN_PRESETS, preset, [f"train.family={family}"])


@pytest.mark.slow
def test_a_timeout_stops_the_run_and_marks_it_failed(root):
    from imagegen.train.launch import LaunchError

    req = {**request(steps=100_000, ckpt_every=100_000, seed=9), "timeout_s": 5}
    with pytest.raises(LaunchError, match="timed out after 5 s"):
        train_run(req, root)
    card = json.loads((prepare(TrainRequest(**req), root).run_dir / "card.json").read_text())
    assert card["status"] == "failed" and "timed out" in card["error"]


def test_the_thread_count_is_part_of_the_run_id_and_is_what_training_uses(root):
    """Issue 12: a run's floats depend on torch's intra-op thread count, so it is a config field
    (default 1, never the machine's) hashed into the run id, and training runs on exactly it."""
    import torch

    one, again = prepare(TrainRequest(**request()), root), prepare(TrainRequest(**request(threads=1)), root)
    two = prepare(TrainRequest(**request(threads=2)), root)
    assert one.config.threads == 1 and one.run_id == again.run_id
    assert two.run_id != one.run_id and two.identity["config"]["threads"] == 2
    seen: list[int] = []
    before = torch.get_num_threads()
    out = train_run(request(threads=2, steps=2, ckpt_every=2), root, progress=lambda info: seen.append(torch.get_num_threads()))
    assert out["finished"] and seen and set(seen) == {2}
    assert torch.get_num_threads() == before  # restored after the run
