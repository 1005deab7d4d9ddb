"""LPIPS (imagegen/perceptual.py) and its use as the KL autoencoder's perceptual term: the distance
follows its formula, weights round-trip through safetensors and the converter, unsafe or damaged
files are refused, and an autoencoder trains with the term through the generic trainer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from _helpers import world_scene_shards
from imagegen.perceptual import LPIPS, LPIPSError, convert, load_lpips, save_lpips
from imagegen.train.checkpoint import read_checkpoint
from imagegen.train.trainer import train
from models.checkpoint import load_family



def tiny_lpips(seed: int = 0) -> LPIPS:
    torch.manual_seed(seed)
    m = LPIPS("tiny")
    for lin in m.lins:
        lin.weight.data.abs_()  # published LPIPS weights are non-negative
    return m


def images(n: int = 6, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1)


def test_distance_is_zero_on_equal_images_and_grows_with_noise():
    m, x = tiny_lpips(), images()
    assert torch.allclose(m(x, x), torch.zeros(len(x)), atol=1e-7)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    d = [m(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.8)]
    assert d[0] < d[1] < d[2], d
    y = images(seed=3)
    assert torch.allclose(m(x, y), m(y, x), atol=1e-6)
    with pytest.raises(LPIPSError, match="one shape"):
        m(x, y[:, :, :8])


def test_distance_matches_the_formula_on_alexnet(tmp_path):
    """Convert a torchvision-format AlexNet state dict and LPIPS-package-format linear layers,
    load the result, and compare with the formula computed here layer by layer."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    features = alexnet(weights=None).features
    bb = {f"features.{k}": v for k, v in features.state_dict().items()}
    chans = (64, 192, 384, 256, 256)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(chans)}
    torch.save(bb, tmp_path / "alexnet.pth")
    torch.save(lins, tmp_path / "lin.pth")
    out = convert("alexnet", tmp_path / "alexnet.pth", tmp_path / "lin.pth", tmp_path / "lpips-alex.safetensors")
    m = load_lpips(out)

    x, y = images(3, 64, seed=5), images(3, 64, seed=6)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = (1, 4, 7, 9, 11)
    want = torch.zeros(3)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    k = 0
    for i, layer in enumerate(features[:12]):
        hx, hy = layer(hx), layer(hy)
        if i in taps:
            nx = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
            ny = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
            w = lins[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
            want += ((nx - ny) ** 2 * w).sum(1).mean((1, 2))
            k += 1
    got = m(x, y)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got, want)


def test_files_round_trip_and_bad_files_are_refused(tmp_path):
    m, x, y = tiny_lpips(), images(), images(seed=9)
    p = save_lpips(m, tmp_path / "tiny.safetensors")
    assert torch.equal(load_lpips(p)(x, y), m(x, y))

    with pytest.raises(LPIPSError, match="do not exist"):
        load_lpips(tmp_path / "missing.safetensors")
    torch.save(m.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(LPIPSError, match="unpickler"):
        load_lpips(tmp_path / "tiny.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LPIPSError, match="not a readable safetensors"):
        load_lpips(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(LPIPSError, match="format"):
        load_lpips(tmp_path / "nometa.safetensors")
    neg = tiny_lpips()
    neg.lins[0].weight.data[0, 0] = -1.0
    with pytest.raises(LPIPSError, match="non-negative"):
        load_lpips(save_lpips(neg, tmp_path / "neg.safetensors"))
    torch.save({"other": torch.ones(1)}, tmp_path / "nolin.pth")
    with pytest.raises(LPIPSError, match="lin0"):
        convert("tiny", p, tmp_path / "nolin.pth", tmp_path / "x.safetensors")
    with pytest.raises(LPIPSError, match="features.0.weight"):
        convert("tiny", tmp_path / "nolin.pth", tmp_path / "tiny.pth", tmp_path / "x.safetensors")


@pytest.mark.slow
def test_kl_autoencoder_trains_with_the_perceptual_term(tmp_path):
    shards = world_scene_shards(tmp_path / "shards")
    weights = save_lpips(tiny_lpips(), tmp_path / "lpips-tiny.safetensors")
    model = {"image_size": 16, "width": 8, "latent_channels": 4, "levels": 1, "perceptual": str(weights),
             "perceptual_weight": 0.5}
    cfg = dict(family="kl_autoencoder", model=model, steps=60, batch_size=16, lr=3e-3, warmup_steps=5, seed=1,
               ckpt_every=60, epoch_batches=6, shuffle_buffer=48, sample_count=4)
    train(cfg, shards, tmp_path / "run")
    m = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert "log/lpips" in m.columns
    assert m["log/lpips"].iloc[-10:].mean() < m["log/lpips"].iloc[:10].mean(), "perceptual distance falls"
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    tensors, _ = read_checkpoint(ckpt)
    assert not any("lins" in k or "perceptual" in k for k in tensors), "the frozen LPIPS is not checkpointed"

    weights.unlink()  # sampling and encoding need no perceptual weights
    ae = load_family(ckpt)
    assert ae.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)
    from models.registry import build_family

    with pytest.raises(LPIPSError, match="do not exist"):  # but training refuses to start without them
        build_family("kl_autoencoder", model)


def test_relative_weight_paths_become_absolute(tmp_path, monkeypatch):
    from models.vae import KLAutoencoderConfig

    monkeypatch.chdir(tmp_path)
    c = KLAutoencoderConfig(image_size=16, perceptual="w/lpips.safetensors")
    assert Path(c.perceptual) == tmp_path / "w" / "lpips.safetensors"
