"""Editing from the samplers (models/editing.py): SDEdit strength endpoints and step counts,
inpainting that keeps the known pixels exactly (with and without RePaint resampling), outpainting,
the DDIM-inversion edit, a latent family through a real autoencoder checkpoint, and bad input."""

from __future__ import annotations

import pytest
import torch

from models.editing import EditError, inpaint, invert, invert_edit, outpaint, sdedit
from _helpers import random_family as family
from models.registry import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET = {"net": "unet", "net_size": "tiny", "image_size": 16,
        "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}
DIT = {"net": "dit", "net_size": "tiny", "image_size": 16}
CASES = [("ddpm", UNET, "ddim"), ("ddpm", UNET, "ddpm"), ("edm", UNET, "heun"), ("edm", UNET, "dpmpp_2m"),
         ("flow", DIT, "euler"), ("flow", UNET, "heun")]



def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Calls:
    def __init__(self, net: torch.nn.Module) -> None:
        self.n = 0
        net.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize("name,net,sampler", CASES)
def test_sdedit_strength_endpoints(name, net, sampler):
    fam, x = family(name, net), images()
    z = torch.randn(x.shape, generator=gen(9))
    assert torch.equal(sdedit(fam, x, 0.0, sampler=sampler, steps=6), x)
    plain = fam.sample(2, sampler=sampler, steps=6, x_T=z, generator=gen())
    one = sdedit(fam, x, 1.0, sampler=sampler, steps=6, noise=z, generator=gen())
    assert torch.allclose(one, plain, atol=1e-6), float((one - plain).abs().max())
    half = sdedit(fam, x, 0.5, sampler=sampler, steps=6, noise=z, generator=gen())
    assert (half - x).abs().max() > 1e-3 and (half - plain).abs().max() > 1e-3


def test_sdedit_runs_the_last_strength_share_of_the_steps():
    fam, x = family("flow", DIT), images()
    calls = Calls(fam.net)
    for s, expected in [(0.05, 0), (0.3, 3), (0.5, 5), (1.0, 10)]:
        calls.n = 0
        sdedit(fam, x, s, steps=10, generator=gen())
        assert calls.n == expected, (s, calls.n)
    # a lower strength stays closer to the input (same noise, same model)
    z = torch.randn(x.shape, generator=gen(3))
    d = [float((sdedit(fam, x, s, steps=10, noise=z) - x).abs().mean()) for s in (0.2, 0.5, 0.9)]
    assert d[0] < d[1] < d[2], d


@pytest.mark.parametrize("name,net,sampler", CASES)
def test_inpainting_keeps_the_known_pixels_exactly(name, net, sampler):
    fam, x = family(name, net, conditioning="class", num_classes=3), images()
    mask = torch.zeros(16, 16)
    mask[4:12, 2:9] = 1
    out = inpaint(fam, x, mask, [0, 2], sampler=sampler, steps=5, guidance=2.0, generator=gen())
    assert out.trivial is None
    keep = mask == 0
    assert torch.equal(out.sample[:, :, keep], x[:, :, keep])
    assert (out.sample[:, :, ~keep] - x[:, :, ~keep]).abs().mean() > 0.05


@pytest.mark.parametrize("name,sampler", [("ddpm", "ddim"), ("ddpm", "ddpm"), ("edm", "euler"), ("flow", "euler")])
def test_repaint_resampling_keeps_pixels_and_changes_the_inside(name, sampler):
    fam, x = family(name, UNET), images()
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:, :] = 1
    calls = Calls(fam.net)
    a = inpaint(fam, x, mask, sampler=sampler, steps=4, generator=gen()).sample
    n1 = calls.n
    b = inpaint(fam, x, mask, sampler=sampler, steps=4, resample=3, generator=gen()).sample
    assert calls.n - n1 == 3 * n1 - 2 * (1 if sampler != "heun" else 0)  # no jump back after the last step
    assert torch.equal(b[..., :8, :], x[..., :8, :])
    assert (a[..., 8:, :] - b[..., 8:, :]).abs().max() > 1e-4


def test_blending_scheme_matches_a_hand_written_repaint_loop():
    """Flow Euler with the known region re-imposed after each step, written out by hand."""
    from models.samplers import flow_timesteps

    fam, x = family("flow", DIT), images(1)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, 10:] = 1
    z = torch.randn(x.shape, generator=gen(4))
    out = inpaint(fam, x, mask, steps=4, noise=z).sample
    keep = mask == 0
    ts = flow_timesteps(4).tolist()
    y = z.clone()
    with torch.no_grad():
        for tc, tn in zip(ts, ts[1:]):
            y = torch.where(keep, (1 - tc) * x + tc * z, y)
            y = y + (tn - tc) * fam.net(y, torch.full((1,), tc), {})
    y = torch.where(keep, x, y).clamp(-1, 1)
    assert torch.allclose(out, y, atol=1e-5)


def test_trivial_masks_are_said_and_handled():
    fam, x = family("ddpm", UNET), images()
    zeros = inpaint(fam, x, torch.zeros(16, 16), steps=3)
    assert "all zeros" in zeros.trivial and torch.equal(zeros.sample, x)
    z = torch.randn(x.shape, generator=gen(2))
    ones = inpaint(fam, x, torch.ones(2, 1, 16, 16), steps=3, noise=z)
    assert "all ones" in ones.trivial
    assert torch.allclose(ones.sample, fam.sample(2, steps=3, x_T=z), atol=1e-6)


def test_outpainting_extends_the_canvas_and_keeps_the_input():
    fam = family("flow", UNET)
    small = images(2)[:, :, :16, :12]
    out = outpaint(fam, small, right=4, steps=4, generator=gen())
    assert out.sample.shape == (2, 3, 16, 16)
    assert torch.equal(out.sample[..., :12], small)
    assert out.sample[..., 12:].abs().mean() > 0.01
    wider = outpaint(fam, small, right=8, steps=2, generator=gen())  # an any-size family: an extended canvas
    assert wider.sample.shape == (2, 3, 16, 20) and torch.equal(wider.sample[..., :12], small)
    with pytest.raises(EditError, match=r"is 16x13 with 3 channels, the model makes 16x16 images, or sides that are "
                                        r"multiples of \d+"):
        outpaint(fam, small, right=1)


def test_inversion_edit_reconstructs_with_the_source_and_changes_with_another_label():
    # v-prediction: a random eps-net's x0 estimate at t ~ T is huge and DDIM clips it (not invertible)
    for name, net, kw in [("ddpm", UNET, {"prediction": "v"}), ("flow", DIT, {}), ("edm", UNET, {})]:
        fam, x = family(name, net, conditioning="class", num_classes=3, **kw), images(2)
        x_T = invert(fam, x, [1, 1], steps=40)
        assert x_T.shape == x.shape
        back = invert_edit(fam, x, [1, 1], [1, 1], steps=40)
        other = invert_edit(fam, x, [1, 1], [2, 0], steps=40, guidance=3.0)
        err, moved = float((back - x).abs().mean()), float((other - x).abs().mean())
        assert err < 0.1 and moved > 3 * err, (name, err, moved)
        if name == "ddpm":  # the fixed-point inversion (Pan et al. 2023) closes most of the gap
            fp = float((invert_edit(fam, x, [1, 1], [1, 1], steps=40, fixed_point_iters=2) - x).abs().mean())
            assert fp < err / 5, (fp, err)


def test_consistency_family_edits():
    fam, x = family("ict", UNET, curriculum_steps=10), images()
    z = torch.randn(x.shape, generator=gen(2))
    assert torch.equal(sdedit(fam, x, 0.0, steps=2), x)
    assert torch.allclose(sdedit(fam, x, 1.0, steps=2, noise=z, generator=gen()),
                          fam.sample(2, steps=2, x_T=z, generator=gen()), atol=1e-6)
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    out = inpaint(fam, x, mask, steps=2, generator=gen()).sample
    assert torch.equal(out[..., 8:, :], x[..., 8:, :])


def test_bad_input_is_named():
    fam, x = family("ddpm", UNET), images()
    for s in (-0.1, 1.5, "0.5", True):
        with pytest.raises(EditError, match="strength must be a number in \\[0, 1\\]"):
            sdedit(fam, x, s)
    with pytest.raises(EditError, match="init image is 7x7 with 3 channels, the model makes 16x16"):
        sdedit(fam, x[..., :7, :7], 0.5)
    assert sdedit(fam, x[..., :8, :12], 0.5, steps=2).shape == (2, 3, 8, 12)  # any-size: edits at another size
    with pytest.raises(EditError, match="the mask is 8x16, the image is 16x16"):
        inpaint(fam, x, torch.ones(8, 16))
    with pytest.raises(EditError, match="0 \\(keep\\) or 1"):
        inpaint(fam, x, torch.full((16, 16), 0.5))
    with pytest.raises(EditError, match="resample=2 needs a one-step sampler"):
        inpaint(family("edm", UNET), x, torch.eye(16), sampler="dpmpp_2m", resample=2)
    with pytest.raises(EditError, match="must lie in \\[-1, 1\\]"):
        sdedit(fam, x * 3, 0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        sdedit(fam, x, 0.5, sampler="euler")


def test_latent_family_edits_through_its_autoencoder(tmp_path):
    from imagegen.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ae_cfg = {"image_size": 16, "levels": 1, "latent_channels": 4, "width": 16}
    ae = build_family("kl_autoencoder", ae_cfg)
    ck = save_checkpoint(tmp_path, 1, family=ae, optimizers={}, schedulers={}, ema=None,
                         config={"family": "kl_autoencoder", "model": ae_cfg}, generator_states={},
                         trainer_state={}, keep=1)
    fam = family("flow", {"net": "dit", "net_size": "tiny", "image_size": 8,
                          "net_overrides": {"patch_size": 2}}, channels=4, data="latents",
                 autoencoder=str(ck), latent_scale=2.0)
    x = images()
    with torch.no_grad():
        recon = ae.decode(ae.encode(x)[0]).clamp(-1, 1)
    assert torch.allclose(sdedit(fam, x, 0.0), recon, atol=1e-5)
    mask = torch.zeros(16, 16)
    mask[:, 9:] = 1  # latent columns 0..3 are fully known, column 4 holds pixel 9: generated
    out = inpaint(fam, x, mask, steps=3, generator=gen())
    pasted = inpaint(fam, x, mask, steps=3, generator=gen(), paste=True)
    assert torch.equal(pasted.sample[..., :9], x[..., :9])
    assert out.sample.shape == x.shape


# ----------------------------------------------------------------------------- the trained variant


def _world(n: int, start: int = 0) -> torch.Tensor:
    import numpy as np

    from imagegen.world.scene import WorldConfig, render_scene

    out = []
    for i in range(start, start + n):
        _, im = render_scene(WorldConfig(), i)
        a = np.asarray(im.convert("RGB").resize((16, 16), resample=3), dtype=np.float32)
        out.append(torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def _checkpoint(tmp_path, fam, name: str, cfg: dict):
    from imagegen.train.checkpoint import save_checkpoint

    return str(save_checkpoint(tmp_path, 1, family=fam, optimizers={}, schedulers={}, ema=None,
                               config={"family": name, "model": cfg}, generator_states={}, trainer_state={}, keep=1))


@pytest.mark.parametrize("inner,net", [("flow", UNET), ("ddpm", DIT)])
def test_trained_inpainting_starts_as_its_base_and_takes_mask_channels(tmp_path, inner, net):
    from models.inpainting import random_masks

    base = family(inner, net)
    ck = _checkpoint(tmp_path, base, inner, net)
    fam = build_family("inpainting", {**net, "inner": inner, "base": ck})
    assert fam.inner.net.net.cfg.in_channels == 7
    x, t = images(), torch.rand(2) * (1 if inner == "flow" else 999)
    t = t if inner == "flow" else t.long()
    with torch.no_grad():
        fam.inner.net.extra = torch.randn(2, 4, 16, 16)
        assert torch.equal(fam.net(x, t, {}), base.net(x, t, {}))  # new input channels start at zero
        fam.inner.net.extra = None
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    out = fam.sample(2, steps=3, image=x, mask=mask, generator=gen())
    assert torch.equal(out[:, :, mask == 0], x[:, :, mask == 0])  # pasted back
    m = random_masks(64, 16, fam.cfg, gen(), torch.device("cpu"))
    frac = m.flatten(1).mean(1)
    assert m.shape == (64, 1, 16, 16) and bool(((m == 0) | (m == 1)).all())
    assert (frac == 1).any() and (frac < 1).any() and (frac > 0).all()
    with pytest.raises(ValueError, match="the image is \\(2, 3, 8, 8\\), the model takes"):
        fam.sample(2, steps=2, image=x[..., :8, :8], mask=mask)
    with pytest.raises(ValueError, match="give both image and mask"):
        fam.sample(2, steps=2, image=x)
    with pytest.raises(ValueError, match="base .* is a 'edm' run"):
        build_family("inpainting", {**net, "inner": inner,
                                    "base": _checkpoint(tmp_path / "e", family("edm", net), "edm", net)})


@pytest.mark.slow
def test_trained_inpainting_learns_to_use_the_known_region(tmp_path):
    """A flow base trained on world scenes, then the inpainting variant trained from it: on held-out
    scenes its masked-region error drops below its own step-0 value (the base, blind to the context)."""
    from models.base import train_step
    from models.inpainting import masked_region_error

    x = _world(256)
    base = build_family("flow", UNET)
    opt = {"model": torch.optim.AdamW(base.optimizers_spec()["model"], lr=2e-3)}
    for i in range(150):
        g = gen(i)
        train_step(base, opt, {"image": x[torch.randint(0, 256, (16,), generator=g)]}, g)
    fam = build_family("inpainting", {**UNET, "inner": "flow", "base": _checkpoint(tmp_path, base, "flow", UNET)})
    held, mask = _world(32, start=5000), torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    z = torch.randn(held.shape, generator=gen(0))

    def err() -> float:
        return masked_region_error(fam.sample(32, steps=10, x_T=z, image=held, mask=mask), held, mask[None, None])

    before = err()
    opt = {"model": torch.optim.AdamW(fam.optimizers_spec()["model"], lr=1e-3)}
    for i in range(150):
        g = gen(1000 + i)
        train_step(fam, opt, {"image": x[torch.randint(0, 256, (16,), generator=g)]}, g)
    after = err()
    print(f"trained inpainting: masked-region MSE at step 0 {before:.4f}, after 150 steps {after:.4f}")
    assert after < 0.9 * before  # measured 0.184 -> 0.138
