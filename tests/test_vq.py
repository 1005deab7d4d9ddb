"""VQ-VAE and FSQ tokenizers through the generic trainer on world scenes: reconstruction improves,
dead-code restarts raise codebook usage, tokens round-trip, exact resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from _helpers import world_scene_shards
from imagegen.train.trainer import train
from models.checkpoint import load_family


MODEL = {"image_size": 16, "levels": 2, "width": 8, "codebook_size": 64, "code_dim": 4}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return world_scene_shards(tmp_path_factory.mktemp("vq-shards"))


def cfg(**kw):
    base = dict(family="vq", model=MODEL, steps=80, batch_size=16, lr=2e-3, warmup_steps=5, seed=6, ckpt_every=80,
                epoch_batches=6, shuffle_buffer=48, sample_count=4)
    base.update(kw)
    return base


@pytest.mark.slow
def test_dead_code_restarts_raise_usage(shards, tmp_path):
    train(cfg(model={**MODEL, "dead_threshold": 0.5}), shards, tmp_path / "restart")
    train(cfg(model={**MODEL, "dead_threshold": 0.0}), shards, tmp_path / "plain")
    a = pd.read_parquet(tmp_path / "restart" / "metrics.parquet")
    b = pd.read_parquet(tmp_path / "plain" / "metrics.parquet")
    usage_a, usage_b = a["log/usage"].iloc[-10:].mean(), b["log/usage"].iloc[-10:].mean()
    print(f"codebook usage over the last 10 steps: restarts {usage_a:.3f}, none {usage_b:.3f}; perplexity "
          f"{a['log/perplexity'].iloc[-10:].mean():.1f} vs {b['log/perplexity'].iloc[-10:].mean():.1f}")
    assert usage_a > usage_b
    assert a["log/mse"].iloc[-10:].mean() < a["log/mse"].iloc[:10].mean()
    fam = load_family(sorted((tmp_path / "restart" / "checkpoints").iterdir())[-1])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t = fam.encode_tokens(x)
    assert t.shape == (2, 4, 4) and int(t.max()) < 64
    assert fam.decode_tokens(t).shape == (2, 3, 16, 16)
    assert fam.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 3, 16, 16)


def test_fsq_trains_and_round_trips_its_codes(shards, tmp_path):
    train(cfg(steps=40, ckpt_every=40, model={**MODEL, "quantizer": "fsq", "fsq_levels": [5, 4, 3]}), shards,
          tmp_path / "fsq")
    m = pd.read_parquet(tmp_path / "fsq" / "metrics.parquet")
    assert m["log/mse"].iloc[-8:].mean() < m["log/mse"].iloc[:8].mean()
    fam = load_family(sorted((tmp_path / "fsq" / "checkpoints").iterdir())[-1])
    assert fam.vocab_size == 60
    tokens = torch.arange(60).view(1, 6, 10) % 60
    z = fam.codes_to_latent(tokens)
    _, back = fam.quantize(torch.atanh((z.clamp(-0.999, 0.999))))
    assert torch.equal(back, tokens)


def test_vq_resume_gives_the_same_next_losses(shards, tmp_path):
    c = cfg(steps=6, ckpt_every=3, warmup_steps=1, model={**MODEL, "dead_threshold": 0.5})
    train(c, shards, tmp_path / "full")
    train(c, shards, tmp_path / "part", stop_after=5)
    train(c, shards, tmp_path / "part")
    a = pd.read_parquet(tmp_path / "full" / "metrics.parquet")["loss/model"].tolist()
    b = pd.read_parquet(tmp_path / "part" / "metrics.parquet")["loss/model"].tolist()
    assert a == b


@pytest.mark.slow
def test_maskgit_on_token_shards_from_a_vq_run(tmp_path):
    """Tokens encoded once by a frozen VQ run into a registered dataset; a class-conditional
    MaskGIT trains on them (masked-token accuracy rises) and samples decode to images."""
    from _helpers import register_world_dataset

    from imagegen.latents import encode_dataset
    from imagegen.registry import get_dataset
    from imagegen.train.runs import train_run
    from imagegen.world.scene import SHAPES

    root = tmp_path / "root"
    register_world_dataset(root, n=64, per_shard=16)
    vq = train_run({"dataset": "world-tiny", "train": cfg(steps=60, ckpt_every=60)}, root)["run_id"]
    tid = encode_dataset(root, "world-tiny", vq)
    card = get_dataset(root, tid).card
    assert card["tokens"] and card["vocab_size"] == 64 and card["latent_shape"] == [1, 4, 4]
    res = train_run({"dataset": tid, "train": {
        "family": "maskgit", "model": {"conditioning": "class", "hidden": 32, "depth": 2, "heads": 2},
        "label_keywords": list(SHAPES), "steps": 80, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5,
        "ckpt_every": 80, "epoch_batches": 4, "shuffle_buffer": 64, "sample_count": 5, "sample_steps": 4,
        "sample_guidance": 2.0}}, root)
    m = pd.read_parquet(Path(res["metrics"]))
    assert m["log/masked_accuracy"].iloc[-10:].mean() > m["log/masked_accuracy"].iloc[:10].mean()
    fam = load_family(res["checkpoint"])
    x = fam.sample(5, conditioning=[0, 1, 2, 3, 4], steps=4, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 16, 16) and x.abs().max() <= 1
