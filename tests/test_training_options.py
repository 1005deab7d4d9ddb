"""Training options of the diffusion/flow families: DDPM's x0 target and min-SNR-gamma weighting
(one x0-space weight min(SNR, gamma) whatever the target), flow's training timestep shift."""

from __future__ import annotations

import pytest
import torch

from models.ddpm import min_snr_weight
from models.diffusion import x0_eps_from_pred
from models.registry import build_family


UNET = {"net": "unet", "net_size": "tiny", "image_size": 16,
        "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}


def capture(fam):
    """Record the (x_t, t, output) of every call of the family's network."""
    seen = []
    fam.net.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), args[1].detach(), out.detach())))
    return seen


def perturbed(fam):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # zero-initialised outputs would make every target trivial
    return fam


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_is_one_x0_space_weight_for_every_target(prediction):
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    fam = perturbed(build_family("ddpm", {**UNET, "prediction": prediction, "loss_weighting": "min_snr",
                                          "min_snr_gamma": 5.0}))
    seen = capture(fam)
    loss = fam.loss({"image": x0}, torch.Generator().manual_seed(0)).losses["model"]
    x_t, t, out = seen[-1]
    ab = fam.alphas_cumprod[t]
    x0_hat, _ = x0_eps_from_pred(out.double(), x_t.double(), ab, prediction)
    snr = ab / (1 - ab)
    expected = (snr.clamp(max=5.0) * ((x0_hat - x0.double()) ** 2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)
    plain = build_family("ddpm", {**UNET, "prediction": prediction})
    plain.load_state_dict(fam.state_dict())
    assert not torch.allclose(plain.loss({"image": x0}, torch.Generator().manual_seed(0)).losses["model"], loss)


def test_x0_target_and_sampling():
    fam = perturbed(build_family("ddpm", {**UNET, "prediction": "x0"}))
    seen = capture(fam)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    loss = fam.loss({"image": x0}, torch.Generator().manual_seed(1)).losses["model"]
    torch.testing.assert_close(loss, ((seen[-1][2] - x0) ** 2).mean())
    for sampler in ("ddpm", "ddim"):
        x = fam.sample(2, sampler=sampler, steps=3, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_min_snr_weight_values():
    ab = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)  # SNR 1, 9, 99
    torch.testing.assert_close(min_snr_weight(ab, 5.0, "x0"), torch.tensor([1.0, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weight(ab, 5.0, "eps"), torch.tensor([1.0, 5 / 9, 5 / 99]))
    torch.testing.assert_close(min_snr_weight(ab, 5.0, "v"), torch.tensor([0.5, 0.5, 5 / 100]))


def test_flow_train_shift_moves_the_training_times_towards_noise():
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    times = {}
    for shift in (1.0, 3.0):
        fam = build_family("flow", {**UNET, "train_shift": shift})
        seen = capture(fam)
        fam.loss({"image": x0}, torch.Generator().manual_seed(0))
        times[shift] = seen[-1][1].double()
    t = times[1.0]
    torch.testing.assert_close(times[3.0], 3 * t / (1 + 2 * t), rtol=1e-6, atol=1e-7)
    assert (times[3.0] >= t).all()
