"""Denoiser networks: shapes per conditioning mode, zero-inits, conditioning and masks that matter,
gradient flow, config errors, RoPE, and the FLOP estimate against torch's own counter."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.nets import DiT, DiTConfig, MMDiTConfig, UNet, UNetConfig, build_net
from models.nets.layers import apply_rope_2d, rope_2d, sincos_pos_embed_2d, timestep_embedding

B, TXT, L, NC = 3, 16, 5, 10
KINDS = ["unet", "dit", "mmdit"]
CONFIGS = {"unet": UNetConfig, "dit": DiTConfig, "mmdit": MMDiTConfig}
# The tiny presets at 16x16 instead of 32x32 keep the suite fast on 2 busy cores; the 32x32
# defaults are covered by test_tiny_presets_at_default_size.
SMALL = {"unet": dict(image_size=16, attention_resolutions=(8,)), "dit": dict(image_size=16), "mmdit": dict(image_size=16)}


def make(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_net(kind, CONFIGS[kind].preset("tiny", **{**SMALL[kind], **overrides}))


def perturb(net: torch.nn.Module, seed: int = 1, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def inputs(net, batch: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c, s = net.cfg.in_channels, net.cfg.image_size
    return torch.randn(batch, c, s, s, generator=g), torch.rand(batch, generator=g) * 10


def text_cond(batch: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[:, 3:] = False
    return {
        "pooled": torch.randn(batch, TXT, generator=g),
        "tokens": torch.randn(batch, L, TXT, generator=g),
        "token_mask": mask,
    }


MODES = {
    "none": ({}, lambda: {}),
    "class": ({"num_classes": NC}, lambda: {"class": torch.tensor([0, 4, NC])}),
    "pooled": ({"text_dim": TXT}, lambda: {"pooled": torch.randn(B, TXT)}),
    "cross": ({"text_dim": TXT, "cross_attention": True}, text_cond),
    "all": (
        {"num_classes": NC, "text_dim": TXT, "cross_attention": True},
        lambda: {**text_cond(), "class": torch.tensor([1, 2, 3])},
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_shapes_per_conditioning_mode(kind, mode):
    overrides, cond = MODES[mode]
    net = perturb(make(kind, **overrides))
    x, t = inputs(net)
    out = net(x, t, cond())
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_learned_sigma_out_channels(kind):
    net = perturb(make(kind, in_channels=4, out_channels=8))
    x, t = inputs(net)
    assert net(x, t).shape == (B, 8, 16, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_presets_at_default_size(kind):
    cfg = CONFIGS[kind].preset("tiny")
    assert cfg.image_size == 32
    net = perturb(build_net(kind, cfg))
    x, t = inputs(net, batch=2)
    net(x, t).pow(2).mean().backward()
    assert net(x, t).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_zero_at_init(kind):
    net = make(kind, num_classes=NC, text_dim=TXT, cross_attention=True)
    x, t = inputs(net)
    out = net(x, t, {**text_cond(), "class": torch.tensor([0, 1, NC])})
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


def test_dit_blocks_are_identity_at_init():
    net = make("dit", num_classes=NC, text_dim=TXT, cross_attention=True, rope=True)
    x, t = inputs(net)
    cond = text_cond()
    c = net.cond_embed(t, cond)
    h = torch.randn(B, net.cfg.grid**2, net.cfg.hidden_size)
    rope = (net.rope_cos, net.rope_sin)
    for block in net.blocks:
        assert torch.equal(block(h, c, rope, cond["tokens"], cond["token_mask"]), h)
    # and after perturbing the zero-inits a block is no longer the identity (the test can fail)
    perturb(net)
    c = net.cond_embed(t, cond)
    assert not torch.allclose(net.blocks[0](h, c, rope, cond["tokens"], cond["token_mask"]), h)


def test_unet_res_blocks_are_identity_on_main_path_at_init():
    net = make("unet", num_classes=NC)
    block = net.down[0][0]  # 32 -> 32 channels, identity skip
    x = torch.randn(2, 32, 16, 16)
    emb = torch.randn(2, 4 * net.cfg.model_channels)
    assert torch.equal(block(x, emb, None, None), x)


@pytest.mark.parametrize("kind", KINDS)
def test_class_label_changes_output(kind):
    net = perturb(make(kind, num_classes=NC))
    x, t = inputs(net, batch=1)
    outs = [net(x, t, {"class": torch.tensor([k])}) for k in (0, 1, NC)]
    assert not torch.allclose(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    # a missing "class" means the null class
    assert torch.equal(net(x, t, {}), outs[2])


@pytest.mark.parametrize("kind", KINDS)
def test_time_and_pooled_change_output(kind):
    net = perturb(make(kind, text_dim=TXT))
    x, t = inputs(net, batch=1)
    p = {"pooled": torch.randn(1, TXT)}
    base = net(x, t, p)
    assert not torch.allclose(base, net(x, t + 1.0, p))
    assert not torch.allclose(base, net(x, t, {"pooled": torch.randn(1, TXT)}))


@pytest.mark.parametrize("kind", KINDS)
def test_token_mask_matters(kind):
    net = perturb(make(kind, text_dim=TXT, cross_attention=True))
    x, t = inputs(net)
    cond = text_cond()
    out = net(x, t, cond)
    # changing masked-out tokens leaves the output exactly as it was
    changed = dict(cond, tokens=cond["tokens"].clone())
    changed["tokens"][:, 3:] = torch.randn(B, L - 3, TXT) * 100
    assert torch.equal(net(x, t, changed), out)
    # changing a kept token does change it
    changed["tokens"][:, 0] += 1.0
    assert not torch.allclose(net(x, t, changed), out)
    # a row with nothing kept equals "no tokens at all" for that sample, with no NaN
    none_kept = dict(cond, token_mask=cond["token_mask"].clone())
    none_kept["token_mask"][1] = False
    out_none = net(x, t, none_kept)
    assert torch.isfinite(out_none).all()
    no_tokens = net(x, t, {"pooled": cond["pooled"]})
    torch.testing.assert_close(out_none[1], no_tokens[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_none[0], out[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter_after_toy_regression(kind):
    net = make(kind, num_classes=NC, text_dim=TXT, cross_attention=True, in_channels=3, out_channels=6)
    x, t = inputs(net, batch=4)
    cond = {**text_cond(4), "class": torch.tensor([0, 1, 2, NC])}
    target = torch.randn(4, 6, 16, 16, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = (net(x, t, cond) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad()
    (net(x, t, cond) - target).pow(2).mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_runs_under_bf16_autocast(kind):
    net = perturb(make(kind, num_classes=NC, text_dim=TXT, cross_attention=True))
    x, t = inputs(net, batch=2)
    cond = {**text_cond(2), "class": torch.tensor([0, NC])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, cond)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("rope", [False, True])
def test_dit_rope_on_and_off(rope):
    net = perturb(make("dit", rope=rope))
    x, t = inputs(net)
    assert net(x, t).shape == x.shape
    assert hasattr(net, "rope_cos") == rope


def test_rope_2d_depends_only_on_offset():
    h = w = 6
    dh = 16
    cos, sin = rope_2d(h, w, dh)
    q, k = torch.randn(dh), torch.randn(dh)

    def score(pq, pk):
        qs = apply_rope_2d(q.expand(h * w, dh)[None, None], cos, sin)[0, 0]
        ks = apply_rope_2d(k.expand(h * w, dh)[None, None], cos, sin)[0, 0]
        return (qs[pq[0] * w + pq[1]] * ks[pk[0] * w + pk[1]]).sum()

    torch.testing.assert_close(score((1, 2), (3, 1)), score((2, 4), (4, 3)))
    assert not torch.allclose(score((1, 2), (3, 1)), score((1, 2), (1, 3)))
    # rotation keeps norms
    rq = apply_rope_2d(torch.randn(1, 1, h * w, dh), cos, sin)
    assert rq.shape == (1, 1, h * w, dh)


def test_embeddings():
    e = timestep_embedding(torch.tensor([0.0, 1.0, 500.0]), 64)
    assert e.shape == (3, 64)
    torch.testing.assert_close(e[0, :32], torch.ones(32))  # cos(0)
    pe = sincos_pos_embed_2d(32, 4, 5)
    assert pe.shape == (20, 32)
    assert len({tuple(r.tolist()) for r in pe}) == 20  # every position distinct


def test_bad_configs_are_refused_clearly():
    with pytest.raises(ValidationError, match="not divisible by patch_size"):
        DiTConfig.preset("tiny", image_size=30, patch_size=4)
    with pytest.raises(ValidationError, match="divisible by 4"):
        UNetConfig.preset("tiny", image_size=30, channel_mult=(1, 2, 2))
    with pytest.raises(ValidationError, match="never reached"):
        UNetConfig.preset("tiny", attention_resolutions=(24,))
    with pytest.raises(ValidationError, match="cross_attention=True needs text_dim"):
        DiTConfig.preset("tiny", cross_attention=True)
    with pytest.raises(ValidationError, match="num_heads"):
        DiTConfig.preset("tiny", hidden_size=64, num_heads=3)
    with pytest.raises(ValidationError):
        DiTConfig.preset("tiny", patch_size=0)
    with pytest.raises(ValidationError):
        UNetConfig.preset("tiny", dropout=1.5)
    with pytest.raises(ValidationError):
        UNetConfig.preset("tiny", bogus_field=1)
    with pytest.raises(ValueError, match="unknown preset 'XL'"):
        DiTConfig.preset("XL")
    with pytest.raises(ValueError, match="unknown preset"):
        UNetConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown kind"):
        build_net("vae", {})
    with pytest.raises(TypeError, match="needs a UNetConfig"):
        build_net("unet", DiTConfig.preset("tiny"))


def test_build_net_from_dict():
    net = build_net("dit", dict(DiTConfig.PRESETS["tiny"], in_channels=4, out_channels=4))
    assert isinstance(net, DiT) and net.cfg.in_channels == 4
    assert isinstance(build_net("unet", UNetConfig.preset("tiny")), UNet)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_are_refused_clearly(kind):
    net = make(kind, num_classes=NC, text_dim=TXT)
    x, t = inputs(net)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 16, 16\] \(or \[B, 3, H, W\] with H, W multiples"):
        net(torch.randn(B, 3, 17, 17), t)  # no side a multiple of the patch / downsampling
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 16, 16\]"):
        net(torch.randn(B, 4, 16, 16), t)
    with pytest.raises(ValueError, match="t must have shape"):
        net(x, t[:2])
    with pytest.raises(ValueError, match="unknown cond keys"):
        net(x, t, {"classes": torch.zeros(B, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"values must lie in \[0, 10\]"):
        net(x, t, {"class": torch.tensor([0, 1, NC + 1])})
    with pytest.raises(ValueError, match="integer tensor"):
        net(x, t, {"class": torch.zeros(B)})
    with pytest.raises(ValueError, match="pooled'\\] must have shape"):
        net(x, t, {"pooled": torch.randn(B, TXT + 1)})
    with pytest.raises(ValueError, match="cross_attention=False"):
        net(x, t, {"tokens": torch.randn(B, L, TXT)})


def test_bad_token_mask_is_refused():
    net = make("dit", text_dim=TXT, cross_attention=True)
    x, t = inputs(net)
    cond = text_cond()
    with pytest.raises(ValueError, match="token_mask'\\] must be bool"):
        net(x, t, dict(cond, token_mask=cond["token_mask"].float()))
    with pytest.raises(ValueError, match="without cond\\['tokens'\\]"):
        net(x, t, {"token_mask": cond["token_mask"]})


def _counted_flops(net, batch: int, cond: dict) -> int:
    x, t = inputs(net, batch=batch)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        net(x, t, cond)
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", KINDS)
def test_flops_estimate_matches_torch_counter(kind):
    net = make(kind, num_classes=NC, text_dim=TXT, cross_attention=True)
    cond = {**text_cond(2), "class": torch.tensor([0, NC])}
    est = net.flops_per_forward(batch=2, context_len=L)
    counted = _counted_flops(net, 2, cond)
    assert abs(est - counted) / counted < 0.01, (est, counted)


@pytest.mark.parametrize("kind", KINDS)
def test_flops_scale_with_batch_and_width(kind):
    net = make(kind)
    f1, f4 = net.flops_per_forward(1), net.flops_per_forward(4)
    assert f1 > 0 and f4 == 4 * f1
    if kind != "unet":
        wide = make(kind, hidden_size=128, num_heads=2)
    else:
        wide = make("unet", model_channels=64, head_channels=64)
    ratio = wide.flops_per_forward(1) / f1
    assert 3.0 < ratio < 4.5, ratio  # width x2 -> matmul FLOPs about x4 (attention scores only x2)
    assert wide.num_params() > 3 * net.num_params()


def test_paper_sizes():
    """DiT-S/2 and DiT-B/2 at 32x32x4 with learned sigma and 1000 classes: paper says 33M / 130M."""
    with torch.device("meta"):
        s2 = DiT(DiTConfig.preset("S", patch_size=2, image_size=32, in_channels=4, out_channels=8, num_classes=1000))
        b2 = DiT(DiTConfig.preset("B", patch_size=2, image_size=32, in_channels=4, out_channels=8, num_classes=1000))
    assert 32.5e6 < s2.num_params() < 33.5e6
    assert 129.5e6 < b2.num_params() < 131e6
    # the paper's Gflops are multiply-adds (6.06 and 23.01); ours count 2 per multiply-add
    assert 11.5e9 < s2.flops_per_forward() < 12.7e9
    assert 45e9 < b2.flops_per_forward() < 47e9


@pytest.mark.parametrize("kind", KINDS)
def test_non_square_inputs_keep_their_shape_and_positions(kind):
    """Aspect-ratio buckets: any H x W that are multiples of the net's stride run; a DiT's token at
    (row, column) gets the same position on a 16x24 grid as on the square one, so the first rows of
    a wide input are embedded exactly like the square input's first rows."""
    net = perturb(make(kind, text_dim=TXT, cross_attention=True))
    m = net.size_multiple
    assert m == (2 if kind == "unet" else net.cfg.patch_size)
    x, t = torch.randn(B, 3, 16, 24), torch.rand(B) * 10
    with torch.no_grad():
        out = net(x, t, text_cond())
    assert out.shape == x.shape and torch.isfinite(out).all()
    if kind != "unet":
        p = net.cfg.patch_size
        pos, _ = net.grid_positions(16 // p, 24 // p, torch.device("cpu"))
        square, _ = net.grid_positions(16 // p, 16 // p, torch.device("cpu"))
        wide = pos[0].reshape(16 // p, 24 // p, -1)[:, : 16 // p].reshape(-1, pos.shape[-1])
        torch.testing.assert_close(wide, square[0])
        # the tall transpose is a different grid, not the wide one re-used
        tall, _ = net.grid_positions(24 // p, 16 // p, torch.device("cpu"))
        assert tall.shape == pos.shape and not torch.equal(tall, pos)
