"""REPA on DiT/MMDiT flow training: the alignment loss's gradient reaches the chosen block and
everything below it, nothing above it and nothing of the frozen encoder; the encoder stays out of
the module tree and the checkpoint; training resumes exactly; both encoder kinds (an open_clip
image tower, a transformers vision model) load through their real code paths."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from _helpers import eval_world_root, tiny_random_clip, world_scene_shards
from imagegen.train.checkpoint import read_checkpoint
from imagegen.train.runs import TrainRequest, prepare
from imagegen.train.trainer import train
from models.registry import build_family, get_family
from models.repa import RepaError, VisionFeatures, get_vision_encoder
from models.checkpoint import load_family



@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return tiny_random_clip(tmp_path_factory.mktemp("repa-clip") / "clip")


def model(encoder: str, net: str = "dit", layer: int = 2, **kw) -> dict:
    return {"net": net, "net_size": "tiny", "image_size": 16, "net_overrides": {"depth": 4, "hidden_size": 32},
            "repa": {"encoder": encoder, "layer": layer, "projector_dim": 16}, **kw}


@pytest.mark.parametrize("net", ["dit", "mmdit"])
def test_repa_gradient_reaches_the_chosen_layer_and_below_only(net, clip):
    torch.manual_seed(0)
    fam = build_family("flow", model(clip, net=net))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # AdaLN-Zero gates start at 0: give every path some signal
        for p in fam.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    fam.train()
    fam.net(x, torch.rand(4), {})  # the training forward whose block-2 tokens are aligned
    fam.zero_grad(set_to_none=True)
    fam.repa.loss(x).backward()
    grads = {n: p.grad for n, p in fam.named_parameters()}

    def reached(prefix: str) -> bool:
        hits = [g for n, g in grads.items() if n.startswith(prefix)]
        return bool(hits) and any(g is not None and g.abs().sum() > 0 for g in hits)

    assert reached("net.blocks.0.") and reached("net.blocks.1.") and reached("net.patch_embed.")
    assert reached("net.cond_embed.") and reached("repa.projector.")
    above = {n: g for n, g in grads.items() if n.startswith(("net.blocks.2.", "net.blocks.3.", "net.final."))}
    assert above and all(g is None for g in above.values())


def test_the_frozen_encoder_is_outside_the_module_tree(clip):
    fam = build_family("flow", model(clip))
    enc = fam.repa.encoder
    feats = enc(torch.rand(2, 3, 16, 16) * 2 - 1)  # the world CLIP's tower is a ResNet: its last feature map
    assert isinstance(enc, VisionFeatures) and feats.ndim == 4 and feats.shape[:2] == (2, enc.dim)
    from imagegen.clip import load_clip

    visual = load_clip(clip).model.visual
    own = {id(p) for p in fam.parameters()}
    assert not any(id(p) in own for p in visual.parameters())
    assert all(not p.requires_grad for p in visual.parameters())
    assert not any("visual" in k or "encoder" in k for k in fam.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    fam.train()
    out = fam.loss({"image": x}, torch.Generator().manual_seed(0))
    out.losses["model"].backward()
    assert all(p.grad is None for p in visual.parameters())
    assert -1.0 <= out.logs["repa_cos"] <= 1.0


@pytest.mark.slow
def test_flow_with_repa_trains_resumes_exactly_and_samples_without_the_encoder(clip, tmp_path):
    shards = world_scene_shards(tmp_path / "shards", n=32, per_shard=16)
    c = dict(family="flow", model=model(clip), steps=4, batch_size=8, lr=2e-3, warmup_steps=1, ckpt_every=2,
             epoch_batches=4, shuffle_buffer=16, sample_count=2, sample_steps=2, seed=2)
    train(c, shards, tmp_path / "full")
    train(c, shards, tmp_path / "part", stop_after=3)
    train(c, shards, tmp_path / "part")
    a = pd.read_parquet(tmp_path / "full" / "metrics.parquet")
    assert a["loss/model"].tolist() == pd.read_parquet(tmp_path / "part" / "metrics.parquet")["loss/model"].tolist()
    assert a["log/repa_cos"].notna().all()
    ckpt = sorted((tmp_path / "full" / "checkpoints").iterdir())[-1]
    tensors, _ = read_checkpoint(ckpt)
    assert any(k.startswith("model/repa.projector.") for k in tensors)
    assert not any("visual" in k for k in tensors), "the frozen encoder is not checkpointed"
    clip_dir = Path(clip.removeprefix("local-dir:"))
    moved = clip_dir.with_name("gone")
    clip_dir.rename(moved)  # sampling needs no encoder
    try:
        fam = load_family(ckpt)
        assert fam.sample(2, steps=2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)
    finally:
        moved.rename(clip_dir)


def test_a_transformers_vision_model_is_an_encoder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                             image_size=28, patch_size=14, num_register_tokens=0)).save_pretrained(tmp_path / "dino")
    enc = VisionFeatures(f"transformers:{tmp_path / 'dino'}")
    feats = enc(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert enc.dim == 24 and feats.shape == (3, 24, 2, 2)
    fam = build_family("flow", model(f"transformers:{tmp_path / 'dino'}", layer=1))
    fam.train()
    out = fam.loss({"image": torch.rand(2, 3, 16, 16) * 2 - 1}, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.losses["model"]) and "repa_cos" in out.logs
    with pytest.raises(RepaError, match="cannot load a safetensors vision model"):
        VisionFeatures(f"transformers:{tmp_path / 'missing'}")


def test_the_world_alias_is_resolved_by_the_run_layer(tmp_path):
    root = tmp_path / "root"
    eval_world_root(root, n=16, per_shard=8)
    req = TrainRequest(dataset="world-tiny", train=dict(family="flow", model=model("world"), steps=1, batch_size=4))
    prep = prepare(req, root)
    assert prep.resolved.model["repa"]["encoder"].startswith("local-dir:")
    assert prep.config.model["repa"]["encoder"] == "world"  # the run id names the alias, not a path
    with pytest.raises(RepaError, match="the run layer resolves it"):
        get_vision_encoder("world")


@pytest.mark.parametrize("cfg,message", [
    ({"net": "unet", "repa": {"encoder": "x", "layer": 1}}, "needs net='dit' or 'mmdit'"),
    ({"net_size": "tiny", "repa": {"encoder": "x", "layer": 3}}, "beyond the net's depth 2"),
    ({"repa": {"encoder": "x", "layer": 1, "weight": 0}}, "weight"),
    ({"repa": {"encoder": "x", "layer": 1, "bogus": 1}}, "bogus"),
])
def test_bad_repa_configs_are_refused(cfg, message):
    with pytest.raises(ValidationError, match=message):
        get_family("flow").Config(**cfg)
