"""Every generative family trains through the same trainer on the same world dataset, is scored
by the same evaluation (FD on the reference CLIP, KID) and lands on one leaderboard."""

from __future__ import annotations

from pathlib import Path

import pytest

from _helpers import register_world_dataset, tiny_random_clip
from imagegen.evaluate.run import evaluate
from imagegen.latents import encode_dataset
from imagegen.leaderboard import leaderboard, write_leaderboard
from imagegen.train.runs import train_run

pytestmark = pytest.mark.slow  # 10 s on the shared 2 cores: outside the fast tier (README, "Tests")

UNET = {"net": "unet", "net_size": "tiny", "image_size": 16,
        "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}
COMMON = {"steps": 12, "batch_size": 8, "lr": 1e-3, "ckpt_every": 12, "epoch_batches": 4, "shuffle_buffer": 32,
          "sample_count": 2, "sample_steps": 2}


def test_every_family_is_evaluated_and_on_the_leaderboard(tmp_path):
    root = tmp_path / "root"
    clip_dir = root / "models" / "reference_clip" / "testclip"
    tiny_random_clip(clip_dir)
    (clip_dir / "card.json").write_text("{}")
    register_world_dataset(root, n=48, per_shard=12, stage_ids={"reference_clip": "testclip"})

    def run(family: str, model: dict, dataset: str = "world-tiny") -> str:
        return train_run({"dataset": dataset, "train": {"family": family, "model": model, **COMMON}}, root)["run_id"]

    runs = {
        "ddpm": run("ddpm", UNET), "edm": run("edm", UNET), "flow": run("flow", UNET),
        "vae": run("vae", {"image_size": 16, "width": 8, "latent_channels": 4}),
        "gan": run("gan", {"image_size": 16, "width": 8, "latent_dim": 16}),
        "vq": run("vq", {"image_size": 16, "width": 8, "codebook_size": 32, "code_dim": 4}),
    }
    kl = run("kl_autoencoder", {"image_size": 16, "width": 8, "latent_channels": 4, "levels": 1})
    runs["latent flow"] = run("flow", {"data": "latents", "net": "dit", "net_size": "tiny",
                                       "net_overrides": {"patch_size": 2}}, encode_dataset(root, "world-tiny", kl))
    runs["maskgit"] = run("maskgit", {"hidden": 16, "depth": 1, "heads": 2},
                          encode_dataset(root, "world-tiny", runs["vq"]))
    settings = dict(metrics=["fid", "kid"], n_samples=20, kid_subsets=5, kid_subset_size=8, batch_size=16,
                    reference="world-tiny", steps=2)
    summaries = []
    for label, rid in runs.items():
        s = evaluate({**settings, "run": rid, "steps": None if label in ("vae", "gan", "vq") else 2}, root)
        fd = [k for k in s["metrics"] if k.startswith("FD-CLIP-")]
        assert fd and s["metrics"][fd[0]] >= 0, label
        summaries.append(s)
    df = leaderboard(root, summaries)
    assert set(df["run_id"]) == set(runs.values())
    assert {"ddpm", "edm", "flow", "vae", "gan", "vq", "maskgit"} <= set(df["family"])
    paths = write_leaderboard(df, tmp_path / "board")
    assert all(Path(p).is_file() for p in paths.values())
