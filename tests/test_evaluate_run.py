"""Evaluating runs and folders end to end: generated sets on disk, FD-<reference CLIP>/KID,
CLIPScore and GenEval rows with provenance, reuse, and refusals before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from _helpers import register_world_dataset, tiny_random_clip
from imagegen.evaluate.images import ImageFolderError
from imagegen.evaluate.run import EvalError, EvalRequest, evaluate
from imagegen.train.runs import train_run

pytestmark = pytest.mark.slow  # 101 s on the shared 2 cores: outside the fast tier (README, "Tests")

NET = {"net": "unet", "net_size": "tiny", "image_size": 16,
       "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("eval-root")
    clip_dir = r / "models" / "reference_clip" / "testclip"
    tiny_random_clip(clip_dir)
    (clip_dir / "card.json").write_text("{}")
    register_world_dataset(r, n=64, per_shard=16, stage_ids={"reference_clip": "testclip"})
    return r


def run(root: Path, steps: int, seed: int = 0) -> str:
    req = {"dataset": "world-tiny", "train": {
        "family": "flow", "model": {**NET, "conditioning": "text", "text_encoder": "world"}, "steps": steps,
        "batch_size": 16, "lr": 2e-3, "warmup_steps": min(10, steps), "ema_decay": 0.9, "ckpt_every": steps,
        "epoch_batches": 4, "shuffle_buffer": 64, "sample_count": 2, "sample_steps": 2, "seed": seed}}
    return train_run(req, root)["run_id"]


def ev(root: Path, **kw) -> dict:
    base = dict(n_samples=48, steps=8, kid_subsets=10, kid_subset_size=16, geneval_max_prompts=12,
                geneval_per_prompt=1, batch_size=16)
    return evaluate({**base, **kw}, root)


def test_a_trained_run_scores_better_than_an_untrained_one(root):
    trained, untrained = run(root, 250), run(root, 1, seed=1)
    good, bad = ev(root, run=trained), ev(root, run=untrained)
    fd = next(k for k in good["metrics"] if k.startswith("FD-CLIP-"))
    assert fd in bad["metrics"] and "FID" not in good["metrics"], "a CLIP distance is never called FID"
    assert good["metrics"][fd] < bad["metrics"][fd]
    assert good["nfe"] == 8 and good["n_samples"] == 48
    rows = pd.read_parquet(Path(good["path"]) / "metrics.parquet")
    assert {"GenEval overall", "GenEval single_object", fd} <= set(rows["metric"])
    assert rows["reference_stats_sha256"].dropna().str.len().eq(64).all()
    assert (rows["run_id"] == trained).all() and (rows["seed"] == 0).all()
    # the generated set is on disk, one file per image, and a second evaluation reuses it
    assert len(list((Path(good["path"]) / "samples").glob("*.png"))) == 48
    again = ev(root, run=trained)
    assert again["eval_id"] == good["eval_id"] and again["metrics"][fd] == pytest.approx(good["metrics"][fd])
    # the generated images can be evaluated as a folder, to the same FD
    folder = ev(root, folder=str(Path(good["path"]) / "samples"), reference="world-tiny",
                metrics=["fid", "clipscore"])
    assert folder["metrics"][fd] == pytest.approx(good["metrics"][fd], rel=1e-6)
    hessel = next(k for k in folder["metrics"] if k.startswith("CLIPScore (Hessel"))
    assert folder["metrics"][hessel] == pytest.approx(good["metrics"][hessel], rel=1e-6)


def test_bad_input_is_refused_before_work(root, tmp_path):
    with pytest.raises(LookupError, match="no training run 'nope-nope'"):
        ev(root, run="nope-nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageFolderError):
        ev(root, folder=str(empty), reference="world-tiny")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (16, 16)).save(mixed / "a.png")
    Image.new("RGB", (20, 20)).save(mixed / "b.png")
    with pytest.raises(ImageFolderError, match="a.png|b.png"):
        ev(root, folder=str(mixed), reference="world-tiny")
    (mixed / "b.png").unlink()
    with pytest.raises(EvalError, match="needs reference="):
        ev(root, folder=str(mixed), metrics=["fid"])
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                               "prompt": "a photo of a circle"}) + "\n{not json\n")
    tid = run(root, 1, seed=1)
    with pytest.raises(ValueError, match="line 2"):
        ev(root, run=tid, metrics=["geneval"], geneval_prompts=str(bad))
    with pytest.raises(ValueError, match="exactly one of run"):
        EvalRequest(run=tid, folder=str(mixed))
    with pytest.raises(EvalError, match="guidance=3.0 needs a conditional model"):
        uncond = train_run({"dataset": "world-tiny", "train": {"family": "flow", "model": NET, "steps": 1,
                                                               "batch_size": 4, "ckpt_every": 1}}, root)["run_id"]
        ev(root, run=uncond, guidance=3.0)


def test_evaluation_runs_on_a_pinned_thread_count_that_is_part_of_its_id(root, monkeypatch):
    """Issue 12: generation and features are CPU float reductions, so an evaluation runs on ``threads``
    (default 1, never the machine's), the count is in the evaluation id, and the previous count is restored."""
    import torch

    import imagegen.evaluate.run as R
    from imagegen.determinism import DEFAULT_THREADS

    assert EvalRequest(run="r").threads == DEFAULT_THREADS == 1
    seen: list[int] = []
    orig = R.generate_set

    def generate_set(*a, **k):  # the real generation, recording the thread count it runs on
        seen.append(torch.get_num_threads())
        return orig(*a, **k)

    monkeypatch.setattr(R, "generate_set", generate_set)
    r = run(root, 1, seed=2)
    before = torch.get_num_threads()
    small = dict(run=r, metrics=["fid"], n_samples=8, kid_subsets=2, kid_subset_size=4)
    one = ev(root, **small)
    two = ev(root, **small, threads=2)
    assert seen == [1, 2] and torch.get_num_threads() == before
    assert one["eval_id"] != two["eval_id"]
    card = json.loads((Path(two["path"]) / "card.json").read_text())
    assert card["identity"]["settings"]["threads"] == 2
