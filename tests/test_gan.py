"""The GAN family through the generic trainer on world scenes: both losses move, the D:G ratio
leaves the generator untouched on discriminator-only steps, R1 / WGAN-GP / spectral norm /
projection conditioning run, sampling through the common interface, exact resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from _helpers import world_scene_shards
from imagegen.train.checkpoint import read_checkpoint
from imagegen.train.trainer import train
from imagegen.world.scene import SHAPES
from models.checkpoint import load_family


MODEL = {"image_size": 16, "latent_dim": 32, "width": 16, "levels": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return world_scene_shards(tmp_path_factory.mktemp("gan-shards"))


def cfg(**kw):
    base = dict(family="gan", model=MODEL, steps=60, batch_size=16, lr=2e-4, betas=(0.5, 0.999), seed=5,
                ckpt_every=30, epoch_batches=6, shuffle_buffer=48, sample_count=4, ema_decay=0.9)
    base.update(kw)
    return base


@pytest.mark.slow
def test_nonsaturating_gan_trains_and_samples(shards, tmp_path):
    train(cfg(model={**MODEL, "r1_gamma": 1.0, "r1_every": 2}), shards, tmp_path / "ns")
    m = pd.read_parquet(tmp_path / "ns" / "metrics.parquet")
    first, last = m.iloc[:10], m.iloc[-10:]
    assert last["log/d_real"].mean() - last["log/d_fake"].mean() > 0, "D tells real from fake"
    assert m["log/r1"].notna().any() and (m["log/diversity"] > 0).all()
    assert len(first) == 10
    fam = load_family(sorted((tmp_path / "ns" / "checkpoints").iterdir())[-1])
    # the generator moved towards the data: its mean image is closer to the real mean than at init
    from imagegen.loader import make_loader
    from models.registry import build_family

    real = next(iter(make_loader(shards, batch_size=96, image_size=16, shuffle_buffer=0)))["image"]
    torch.manual_seed(5)
    init = build_family("gan", MODEL)
    z = torch.randn(96, MODEL["latent_dim"], generator=torch.Generator().manual_seed(1))
    gap = {name: float((f.sample(96, x_T=z).mean(0) - real.mean(0)).pow(2).mean()) for name, f in
           (("init", init), ("trained", fam))}
    print(f"GAN mean-image gap to the data: {gap}")
    assert gap["trained"] < gap["init"]
    x = fam.sample(6, generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 16, 16) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="guidance=3.0 needs a conditional model"):
        fam.sample(2, guidance=3.0)


def test_d_steps_leave_the_generator_alone(shards, tmp_path):
    run = tmp_path / "ratio"
    train(cfg(steps=3, ckpt_every=1, keep_checkpoints=5, model={**MODEL, "d_steps": 3}), shards, run)
    ckpts = sorted((run / "checkpoints").iterdir())
    g = [{k: v for k, v in read_checkpoint(c)[0].items() if k.startswith("model/generator.")} for c in ckpts]
    d = [{k: v for k, v in read_checkpoint(c)[0].items() if k.startswith("model/discriminator.")} for c in ckpts]
    assert all(torch.equal(g[0][k], g[1][k]) for k in g[0]), "step 2: discriminator only"
    assert any(not torch.equal(g[1][k], g[2][k]) for k in g[1]), "step 3: the generator updates"
    assert any(not torch.equal(d[0][k], d[1][k]) for k in d[0])


def test_wgan_gp_conditional_projection_with_spectral_norm(shards, tmp_path):
    model = {**MODEL, "loss_type": "wgan_gp", "spectral_norm": True, "conditioning": "class", "d_steps": 2}
    train(cfg(steps=8, ckpt_every=8, model=model, label_keywords=list(SHAPES), lr=1e-4, betas=(0.0, 0.9)),
          shards, tmp_path / "wgan")
    m = pd.read_parquet(tmp_path / "wgan" / "metrics.parquet")
    assert m["log/gp"].notna().all() and not m["skipped"].any()
    fam = load_family(sorted((tmp_path / "wgan" / "checkpoints").iterdir())[-1])
    assert fam.sample(5, conditioning=[0, 1, 2, 3, 4]).shape == (5, 3, 16, 16)


def test_resume_gives_the_same_next_losses(shards, tmp_path):
    c = cfg(steps=6, ckpt_every=3, model={**MODEL, "r1_gamma": 1.0, "r1_every": 2, "d_steps": 2})
    train(c, shards, tmp_path / "full")
    train(c, shards, tmp_path / "part", stop_after=5)
    train(c, shards, tmp_path / "part")
    cols = ["loss/generator", "loss/discriminator"]
    a = pd.read_parquet(tmp_path / "full" / "metrics.parquet")[cols].to_numpy()
    b = pd.read_parquet(tmp_path / "part" / "metrics.parquet")[cols].to_numpy()
    assert (a == b).all()
