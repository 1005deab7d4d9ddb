"""The VAE family through the generic trainer on world scenes: ELBO terms logged, beta controls
the number of active latent dimensions, sampling through the common interface, exact resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from _helpers import world_scene_shards
from imagegen.train.trainer import train
from models.checkpoint import load_family
from models.vae import active_dimensions

pytestmark = pytest.mark.slow  # 32 s on the shared 2 cores: outside the fast tier (README, "Tests")

MODEL = {"image_size": 16, "latent_channels": 8, "levels": 2, "width": 8}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return world_scene_shards(tmp_path_factory.mktemp("vae-shards"))


def cfg(**kw):
    base = dict(family="vae", model=MODEL, steps=120, batch_size=16, lr=3e-3, warmup_steps=10, seed=4,
                ckpt_every=60, epoch_batches=6, shuffle_buffer=48, sample_count=4)
    base.update(kw)
    return base


def batch_of(shards: list[Path]) -> torch.Tensor:
    from imagegen.loader import make_loader

    return next(iter(make_loader(shards, batch_size=64, image_size=16, shuffle_buffer=0)))["image"]


def test_beta_controls_active_dimensions_and_sampling_works(shards, tmp_path):
    train(cfg(model={**MODEL, "beta": 1.0}), shards, tmp_path / "b1")
    train(cfg(model={**MODEL, "beta": 30.0}), shards, tmp_path / "b30")
    low = pd.read_parquet(tmp_path / "b1" / "metrics.parquet")
    assert low["log/recon"].iloc[-10:].mean() < low["log/recon"].iloc[:10].mean(), "reconstruction improves"
    assert {"log/kl", "log/active_dims", "log/mse"} <= set(low.columns)
    x = batch_of(shards)
    v1 = load_family(sorted((tmp_path / "b1" / "checkpoints").iterdir())[-1])
    v30 = load_family(sorted((tmp_path / "b30" / "checkpoints").iterdir())[-1])
    a1, a30 = active_dimensions(v1, x), active_dimensions(v30, x)
    print(f"active latent dimensions of {v1.latent_shape}: beta=1 {a1}, beta=30 {a30}")
    assert a30 < a1
    s = v1.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 3, 16, 16) and s.abs().max() <= 1
    assert v1.noise_shape == v1.latent_shape


def test_resume_gives_the_same_next_losses(shards, tmp_path):
    full = tmp_path / "full"
    train(cfg(steps=8, ckpt_every=4, warmup_steps=2), shards, full)
    part = tmp_path / "part"
    train(cfg(steps=8, ckpt_every=4, warmup_steps=2), shards, part, stop_after=6)
    train(cfg(steps=8, ckpt_every=4, warmup_steps=2), shards, part)
    a = pd.read_parquet(full / "metrics.parquet")["loss/model"].tolist()
    b = pd.read_parquet(part / "metrics.parquet")["loss/model"].tolist()
    assert a == b
