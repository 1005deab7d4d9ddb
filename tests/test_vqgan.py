"""VQ-GAN and LFQ tokenizers, and the autoencoders' shared discriminator path, through the generic
trainer: the discriminator sits out until disc_start and then trains, the adaptive weight is the
gradient-norm ratio, the frozen LPIPS is used but not checkpointed, resume is exact, LFQ's codes
round-trip and its entropy terms are the entropies they claim to be."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from _helpers import world_scene_shards
from imagegen.perceptual import LPIPS, save_lpips
from imagegen.train.checkpoint import read_checkpoint
from imagegen.train.trainer import train
from models.registry import build_family
from models.checkpoint import load_family


VQ = {"image_size": 16, "levels": 2, "width": 8, "codebook_size": 32, "code_dim": 4}
KL = {"image_size": 16, "levels": 2, "width": 8, "latent_channels": 4}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return world_scene_shards(tmp_path_factory.mktemp("vqgan-shards"), n=48, per_shard=12)


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = LPIPS("tiny")
    for lin in m.lins:
        lin.weight.data.abs_()
    return save_lpips(m, tmp_path_factory.mktemp("lpips") / "lpips-tiny.safetensors")


def cfg(family: str, model: dict, **kw) -> dict:
    base = dict(family=family, model=model, steps=6, batch_size=8, lr=2e-3, warmup_steps=1, seed=3, ckpt_every=3,
                epoch_batches=4, shuffle_buffer=24, sample_count=2)
    base.update(kw)
    return base


def metrics(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "metrics.parquet")


def disc_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(ckpt)
    return {k: v for k, v in tensors.items() if k.startswith("model/discriminator.")}


@pytest.mark.parametrize("family,model", [("vqgan", VQ), ("kl_autoencoder", {**KL, "disc_weight": 0.5}),
                                          ("vqgan", {**VQ, "quantizer": "lfq", "lfq_bits": 5})],
                         ids=["vqgan", "kl_autoencoder", "vqgan-lfq"])
def test_discriminator_sits_out_then_trains_and_resume_is_exact(family, model, shards, lpips_weights, tmp_path):
    model = {**model, "disc_start": 3, "perceptual": str(lpips_weights)}
    c = cfg(family, model)
    train(c, shards, tmp_path / "full")
    train(c, shards, tmp_path / "part", stop_after=4)
    train(c, shards, tmp_path / "part")
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    for col in ("loss/autoencoder", "loss/discriminator"):
        assert a[col].tolist() == b[col].tolist(), col
    assert a["log/disc_on"].tolist() == [0, 0, 0, 1, 1, 1]
    assert a["grad_norm/discriminator"].iloc[:3].isna().all() and a["grad_norm/discriminator"].iloc[3:].gt(0).all()
    assert a["log/lpips"].gt(0).all() and a["log/adv_weight"].gt(0).all()
    # the discriminator is untouched before disc_start (the step-3 checkpoint holds its initial weights)
    torch.manual_seed(c["seed"])
    fresh = {f"model/{k}": v for k, v in build_family(family, model).state_dict().items()
             if k.startswith("discriminator.")}
    ckpts = sorted((tmp_path / "full" / "checkpoints").iterdir())
    at3, at6 = disc_tensors(ckpts[0]), disc_tensors(ckpts[-1])
    assert at3.keys() == fresh.keys() and all(torch.equal(at3[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(at3[k], at6[k]) for k in at3)
    tensors, _ = read_checkpoint(ckpts[-1])
    assert not any("lins" in k or "perceptual" in k for k in tensors), "the frozen LPIPS is not checkpointed"
    fam = load_family(ckpts[-1])
    assert fam.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)
    if family == "vqgan":
        t = fam.encode_tokens(torch.rand(2, 3, 16, 16) * 2 - 1)
        assert t.shape == (2, 4, 4) and int(t.max()) < fam.vocab_size
        assert fam.decode_tokens(t).shape == (2, 3, 16, 16)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    fam = build_family("vqgan", {**VQ, "disc_weight": 0.7})
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = fam.loss({"image": x})
    last = fam.decoder.body[-1].weight
    x_hat, recon, _, _ = fam.reconstruct(x)
    fam._acc.clear()
    g_rec, = torch.autograd.grad(recon, last, retain_graph=True)
    g_gan, = torch.autograd.grad(-fam.discriminator(x_hat).mean(), last)
    expected = 0.7 * float(g_rec.norm() / (g_gan.norm() + 1e-4))
    assert out.logs["adv_weight"] == pytest.approx(expected, rel=1e-4)
    # switching it off leaves the plain disc_weight
    fixed = build_family("vqgan", {**VQ, "disc_weight": 0.7, "adaptive_weight": False})
    assert fixed.loss({"image": x}).logs["adv_weight"] == pytest.approx(0.7)


def test_lfq_codes_round_trip_and_entropy_terms():
    fam = build_family("vq", {**VQ, "quantizer": "lfq", "lfq_bits": 4})
    assert fam.vocab_size == 16 and fam.cfg.latent_channels == 4
    tokens = torch.arange(16).view(1, 4, 4)
    z = fam.codes_to_latent(tokens)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(fam.quantize(z * 0.3)[1], tokens)  # any z with those signs maps back
    # far from 0 every position is certain (entropy ~0); at z = 0 all 16 codes are equally likely
    confident, spread = fam.lfq_entropy(z * 5.0)
    assert float(confident) < 1e-6 and float(spread) == pytest.approx(math.log(16), rel=1e-5)
    zero_each, zero_avg = fam.lfq_entropy(torch.zeros(2, 4, 3, 3))
    assert float(zero_each) == pytest.approx(math.log(16), rel=1e-5)
    assert float(zero_avg) == pytest.approx(math.log(16), rel=1e-5)
    out = fam.loss({"image": torch.rand(4, 3, 16, 16) * 2 - 1})
    assert {"sample_entropy", "codebook_entropy", "commitment", "perplexity"} <= set(out.logs)


def test_lfq_trains_and_resumes_exactly(shards, tmp_path):
    c = cfg("vq", {**VQ, "quantizer": "lfq", "lfq_bits": 6}, steps=5, ckpt_every=2)
    train(c, shards, tmp_path / "full")
    train(c, shards, tmp_path / "part", stop_after=3)
    train(c, shards, tmp_path / "part")
    assert metrics(tmp_path / "full")["loss/model"].tolist() == metrics(tmp_path / "part")["loss/model"].tolist()
    fam = load_family(sorted((tmp_path / "full" / "checkpoints").iterdir())[-1])
    assert fam.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 3, 16, 16)


@pytest.mark.parametrize("family,model,message", [
    ("vqgan", {**VQ, "disc_weight": 0.0}, "disc_weight must be > 0"),
    ("vq", {**VQ, "quantizer": "lfq", "lfq_bits": 17}, "lfq_bits"),
    ("vq", {**VQ, "quantizer": "bsq"}, "quantizer"),
    ("vqgan", {**VQ, "conditioning": "class", "num_classes": 2}, "unconditional"),
])
def test_bad_tokenizer_configs_are_refused(family, model, message):
    from models.registry import get_family

    with pytest.raises(ValidationError, match=message):
        get_family(family).Config(**model)
