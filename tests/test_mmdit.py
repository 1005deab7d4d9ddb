"""MMDiT (SD3's joint attention): text and image tokens meet in one attention with separate weights
per modality, and the flow family trains on caption token sequences with it.  (The generic
network checks — shapes per conditioning mode, masks, zero init, gradients to every parameter,
bf16, FLOPs against torch's counter — run for it in tests/test_nets.py.)"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from _helpers import tiny_random_clip, world_scene_shards
from imagegen.train.trainer import train
from models.nets import MMDiTConfig, build_net
from models.registry import build_family
from models.checkpoint import load_family


TXT, L = 16, 6


def net(depth: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_net("mmdit", MMDiTConfig.preset("tiny", image_size=16, depth=depth, text_dim=TXT, cross_attention=True,
                                              **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # gates start at zero
    return m.eval()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    cond = {"pooled": torch.randn(2, TXT, generator=g), "tokens": torch.randn(2, L, TXT, generator=g),
            "token_mask": torch.ones(2, L, dtype=torch.bool)}
    return x, torch.rand(2, generator=g), cond


@pytest.mark.parametrize("rope", [False, True])
def test_joint_attention_sees_both_modalities(rope):
    m = net(rope=rope)
    x, t, cond = inputs()
    with torch.no_grad():
        img, txt, _ = m.joint_forward(x, t, cond)
        # text -> image: one caption token changes the image tokens (of that sample only)
        moved = dict(cond, tokens=cond["tokens"].clone())
        moved["tokens"][0, 2] += 1.0
        img2, _, _ = m.joint_forward(x, t, moved)
        assert not torch.allclose(img2[0], img[0]) and torch.allclose(img2[1], img[1])
        # image -> text: one patch changes the text stream (a cross-attention DiT's text never changes)
        x2 = x.clone()
        x2[0, :, :4, :4] += 1.0
        _, txt2, _ = m.joint_forward(x2, t, cond)
        assert not torch.allclose(txt2[0], txt[0]) and torch.allclose(txt2[1], txt[1])
        assert txt.shape == (2, L, m.cfg.hidden_size)
    # separate weights per modality: two streams, nothing shared
    block = m.blocks[0]
    assert block.image.qkv.weight.data_ptr() != block.text.qkv.weight.data_ptr()
    assert block.text.mlp is not None and not hasattr(m.blocks[-1].text, "mlp")  # last text stream: pre-only
    # without tokens the text weights are not used at all
    with torch.no_grad():
        ref = m(x, t, {"pooled": cond["pooled"]})
        for p in (q for b in m.blocks for q in b.text.parameters()):
            p.add_(1.0)
        assert torch.equal(m(x, t, {"pooled": cond["pooled"]}), ref)


def test_masked_caption_tokens_are_never_attended():
    m = net()
    x, t, cond = inputs()
    cond["token_mask"][:, 4:] = False
    with torch.no_grad():
        out = m(x, t, cond)
        moved = dict(cond, tokens=cond["tokens"].clone())
        moved["tokens"][:, 4:] = 50.0
        assert torch.equal(m(x, t, moved), out)


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmdit")
    return world_scene_shards(d / "shards", n=32, per_shard=16), tiny_random_clip(d / "clip")


@pytest.mark.slow
def test_flow_trains_on_caption_token_sequences_with_mmdit(text_setup, tmp_path):
    shards, clip = text_setup
    model = {"net": "mmdit", "net_size": "tiny", "image_size": 16, "conditioning": "text", "text_encoder": clip,
             "net_overrides": {"hidden_size": 32, "depth": 2}}
    fam = build_family("flow", model)
    cond = fam.encode_condition({"image": torch.zeros(2, 3, 16, 16), "caption": ["a red circle", "two blue stars"]})
    assert cond["tokens"].ndim == 3 and cond["token_mask"].any(1).all()  # the caption's token sequence
    assert fam.net.context_embed is not None and fam.net.context_embed.in_features == fam.text_dim
    c = dict(family="flow", model=model, steps=4, batch_size=8, lr=2e-3, warmup_steps=1, ckpt_every=2,
             epoch_batches=4, shuffle_buffer=16, sample_count=2, sample_steps=2, seed=5)
    train(c, shards, tmp_path / "full")
    train(c, shards, tmp_path / "part", stop_after=3)
    train(c, shards, tmp_path / "part")
    a = pd.read_parquet(tmp_path / "full" / "metrics.parquet")["loss/model"].tolist()
    assert a == pd.read_parquet(tmp_path / "part" / "metrics.parquet")["loss/model"].tolist()
    fam = load_family(sorted(Path(tmp_path / "full" / "checkpoints").iterdir())[-1])
    x = fam.sample(2, conditioning=["a red circle", "a green square"], steps=2, guidance=2.0,
                   generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
