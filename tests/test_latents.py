"""Latent diffusion on the contract: a KL autoencoder run, its latent dataset (encoded once, unit
variance, reconstruction within a stated error), and a flow family trained on the latents whose
samples decode to images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import register_world_dataset
from imagegen.latents import LatentError, encode_dataset
from imagegen.registry import get_dataset
from imagegen.train.runs import RunError, get_run, train_run
from models.checkpoint import load_family

pytestmark = pytest.mark.slow  # 15 s on the shared 2 cores: outside the fast tier (README, "Tests")

AE = {"image_size": 16, "latent_channels": 4, "levels": 1, "width": 16}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent-root")
    register_world_dataset(root, n=64, per_shard=16)
    ae = train_run({"dataset": "world-tiny", "train": {
        "family": "kl_autoencoder", "model": AE, "steps": 200, "batch_size": 16, "lr": 2e-3, "warmup_steps": 10,
        "ckpt_every": 200, "epoch_batches": 4, "shuffle_buffer": 64, "sample_count": 2}}, root)["run_id"]
    return root, ae


def latents_of(root: Path, dataset_id: str) -> np.ndarray:
    out = []
    for shard in get_dataset(root, dataset_id).shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".npy"):
                    out.append(np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False))
    return np.stack(out)


def test_latent_dataset_is_unit_variance_and_reconstructs(world):
    root, ae = world
    lid = encode_dataset(root, "world-tiny", ae)
    card = get_dataset(root, lid).card
    z = latents_of(root, lid)
    assert z.shape == (64, 4, 8, 8) and card["latent_shape"] == [4, 8, 8]
    assert abs(float(z.std()) - 1.0) < 1e-3, "the measured scale factor gives unit variance"
    print(f"latent scale {card['latent_scale']:.4f}, reconstruction MSE {card['recon_mse']:.5f} (pixels in [-1, 1])")
    from imagegen.loader import make_loader

    images = next(iter(make_loader(get_dataset(root, "world-tiny").shards, batch_size=64, image_size=16,
                                   shuffle_buffer=0)))["image"]
    baseline = float(((images - images.mean(0)) ** 2).mean())  # predicting the mean image
    print(f"mean-image baseline MSE {baseline:.5f}")
    assert card["recon_mse"] < 0.05 and card["recon_mse"] < 0.5 * baseline
    assert encode_dataset(root, "world-tiny", ae) == lid, "encoded once, then reused"
    # decode(stored latent / scale) is the autoencoder's reconstruction of that image
    fam = load_family(get_run(root, ae).checkpoint)
    x = fam.decode(torch.from_numpy(z[:4]) / card["latent_scale"])
    assert x.shape == (4, 3, 16, 16)


def test_a_flow_trains_on_latents_and_samples_decode(world):
    root, ae = world
    lid = encode_dataset(root, "world-tiny", ae)
    res = train_run({"dataset": lid, "train": {
        "family": "flow", "model": {"data": "latents", "net": "dit", "net_size": "tiny",
                                    "net_overrides": {"patch_size": 2}},
        "steps": 30, "batch_size": 16, "lr": 1e-3, "ckpt_every": 30, "epoch_batches": 4, "shuffle_buffer": 64,
        "sample_count": 3, "sample_steps": 4}}, root)
    fam = load_family(res["checkpoint"])
    assert fam.cfg.data == "latents" and fam.noise_shape == (4, 8, 8)
    x = fam.sample(3, steps=4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 16, 16) and x.abs().max() <= 1, "latent samples come back as decoded images"
    with pytest.raises(RunError, match="holds latents; set model.data=latents"):
        train_run({"dataset": lid, "train": {"family": "flow", "model": {"net": "dit", "net_size": "tiny"},
                                             "steps": 2, "batch_size": 4}}, root)
    with pytest.raises(LatentError, match="already holds latents"):
        encode_dataset(root, lid, ae)
