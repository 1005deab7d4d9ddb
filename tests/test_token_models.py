"""Token models on token datasets of tokenizer runs: the autoregressive raster transformer (on the
same VQ token dataset as MaskGIT) and VAR (on the token maps of a multi-scale residual VQ).
Mechanisms, not scores: KV-cache sampling equals uncached sampling token for token, causality
and block-causality hold, the scales reconstruct the tokenizer's residual sum, training runs
through the generic trainer and resumes exactly, samples decode to images."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from _helpers import register_world_dataset
from imagegen.latents import encode_dataset
from imagegen.train.runs import RunError, TrainRequest, prepare, train_run
from imagegen.train.trainer import train
from models.msvq import down
from models.nets.tokens import filter_logits
from models.registry import build_family, get_family
from models.checkpoint import load_family
from models.var import VARError, block_causal_mask
from imagegen.world.scene import SHAPES


TOK = {"image_size": 16, "levels": 2, "width": 8, "codebook_size": 32, "code_dim": 4}
COMMON = dict(batch_size=8, lr=2e-3, warmup_steps=1, epoch_batches=4, shuffle_buffer=16, sample_count=2, seed=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> dict:
    r = tmp_path_factory.mktemp("token-root")
    register_world_dataset(r, n=32, per_shard=16)
    vq = train_run({"dataset": "world-tiny", "train": dict(family="vq", model=TOK, steps=10, ckpt_every=10,
                                                           **COMMON)}, r)
    ms = train_run({"dataset": "world-tiny", "train": dict(family="msvq", model={**TOK, "scales": [1, 2, 4]},
                                                           steps=10, ckpt_every=10, **COMMON)}, r)
    return {"root": r, "vq": vq, "msvq": ms, "vq_tokens": encode_dataset(r, "world-tiny", vq["run_id"]),
            "ms_tokens": encode_dataset(r, "world-tiny", ms["run_id"])}


def request(dataset: str, family: str, model: dict, steps: int = 5) -> TrainRequest:
    return TrainRequest(dataset=dataset, train=dict(family=family, model=model, steps=steps, ckpt_every=2,
                                                    label_keywords=list(SHAPES), sample_guidance=2.0, **COMMON))


def resume_is_exact(req: TrainRequest, root: Path, tmp: Path) -> Path:
    prep = prepare(req, root)
    train(prep.resolved, prep.dataset.shards, tmp / "full")
    train(prep.resolved, prep.dataset.shards, tmp / "part", stop_after=3)
    train(prep.resolved, prep.dataset.shards, tmp / "part")
    a = pd.read_parquet(tmp / "full" / "metrics.parquet")["loss/model"].tolist()
    b = pd.read_parquet(tmp / "part" / "metrics.parquet")["loss/model"].tolist()
    assert len(a) == req.train.steps and a == b
    return sorted((tmp / "full" / "checkpoints").iterdir())[-1]


def perturbed(fam: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)  # AdaLN gates start at zero
    return fam.eval()


# ----------------------------------------------------------------------------- AR


@pytest.mark.slow
def test_ar_trains_on_the_maskgit_token_dataset_and_kv_cache_sampling_equals_uncached(root, tmp_path):
    req = request(root["vq_tokens"], "ar", {"conditioning": "class", "hidden": 32, "depth": 2, "heads": 2})
    ckpt = resume_is_exact(req, root["root"], tmp_path)
    fam = perturbed(load_family(ckpt))
    assert fam.cfg.vocab_size == 32 and fam.default_steps == 16
    for opts in ({}, {"top_k": 5, "temperature": 0.8}, {"top_p": 0.7}):
        g = [torch.Generator().manual_seed(4) for _ in range(2)]
        a = fam.sample_result(5, conditioning=[0, 1, 2, 3, 4], guidance=2.0, generator=g[0], **opts)
        b = fam.sample_result(5, conditioning=[0, 1, 2, 3, 4], guidance=2.0, generator=g[1], kv_cache=False, **opts)
        assert a.sample.shape == (5, 3, 16, 16) and a.nfe == 16
        assert torch.equal(a.sample, b.sample), opts
    fam.cfg = fam.cfg.model_copy(update={"autoencoder": None})  # token grids, to compare token by token
    g = [torch.Generator().manual_seed(7) for _ in range(2)]
    ta = fam.sample(3, conditioning=[0, 1, 2], generator=g[0])
    tb = fam.sample(3, conditioning=[0, 1, 2], generator=g[1], kv_cache=False)
    assert ta.shape == (3, 1, 4, 4) and torch.equal(ta, tb) and len(ta.unique()) > 1


def test_ar_is_causal_in_raster_order():
    fam = perturbed(build_family("ar", {"image_size": 4, "vocab_size": 16, "hidden": 16, "depth": 2, "heads": 2}))
    tokens = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    base = fam.logits(tokens, {})
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 16
    out = fam.logits(changed, {})
    torch.testing.assert_close(out[:, :7], base[:, :7])  # row i predicts token i from tokens < i
    assert not torch.allclose(out[:, 7:], base[:, 7:])


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all() and torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.75: the two most likely
    assert torch.isfinite(filter_logits(logits, top_p=0.4))[0].tolist() == [True, False, False, False]
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)


# ----------------------------------------------------------------------------- VAR


def test_msvq_scales_reconstruct_the_residual_sum(root):
    tok = load_family(root["msvq"]["checkpoint"])
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    z = tok.encode_latent(x)
    f_hat, flat = tok.quantize(z)
    maps = tok.split(flat)
    assert [m.shape[1:] for m in maps] == [(1, 1), (2, 2), (4, 4)]
    parts = tok.scale_latents(maps)
    torch.testing.assert_close(torch.stack(parts).sum(0), f_hat)
    packed = tok.encode_tokens(x)
    assert packed.shape == (4, 3, 4, 4) and [torch.equal(a, b) for a, b in zip(tok.unpack(packed), maps)] == [True] * 3
    torch.testing.assert_close(tok.codes_to_latent(packed), f_hat)
    torch.testing.assert_close(tok.decode_tokens(packed), tok.decoder(f_hat))
    # each scale quantises what the coarser ones left over: the residual shrinks
    residual = [float((z - torch.stack(parts[:k]).sum(0)).pow(2).mean()) for k in range(1, 4)]
    assert residual[-1] < float(z.pow(2).mean()) and residual[-1] < residual[0]
    # VAR's inputs: the partial sums, area-downsampled to the next scale
    for k, inp in enumerate(tok.next_scale_inputs(maps)):
        torch.testing.assert_close(inp, down(torch.stack(parts[:k + 1]).sum(0), tok.scales[k + 1]))


def test_msvq_trains_through_the_trainer_and_resumes_exactly(root, tmp_path):
    req = TrainRequest(dataset="world-tiny", train=dict(family="msvq", model={**TOK, "scales": [1, 2, 4]}, steps=5,
                                                       ckpt_every=2, **COMMON))
    tok = load_family(resume_is_exact(req, root["root"], tmp_path))
    assert tok.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)
    assert tok.noise_shape == (3, 4, 4)


def test_var_mask_is_block_causal(root):
    mask = block_causal_mask((1, 2))
    assert mask.tolist() == [[True, False, False, False, False]] + [[True] * 5] * 4
    fam = perturbed(build_family("var", {"autoencoder": str(root["msvq"]["checkpoint"]), "channels": 3,
                                         "image_size": 4, "vocab_size": 32, "hidden": 16, "depth": 2, "heads": 2}))
    tok = fam.tokenizer
    maps = tok.split(tok.quantize(tok.encode_latent(torch.rand(2, 3, 16, 16) * 2 - 1))[1])
    base = fam.logits(maps, {})
    changed = [m.clone() for m in maps]
    changed[1][:, 0, 0] = (changed[1][:, 0, 0] + 1) % 32  # a token of scale 2 (positions 1..4)
    out = fam.logits(changed, {})
    torch.testing.assert_close(out[:, :5], base[:, :5])  # scales 1 and 2 never see scale 2's tokens
    assert not torch.allclose(out[:, 5:], base[:, 5:])  # scale 3 is predicted from them


def test_var_trains_resumes_exactly_and_kv_cache_sampling_equals_uncached(root, tmp_path):
    req = request(root["ms_tokens"], "var", {"conditioning": "class", "hidden": 32, "depth": 2, "heads": 2})
    ckpt = resume_is_exact(req, root["root"], tmp_path)
    fam = perturbed(load_family(ckpt))
    assert fam.default_steps == 3 and fam.cfg.channels == 3
    from imagegen.train.checkpoint import read_checkpoint

    assert not any(k.startswith(("model/_autoencoder", "model/tokenizer")) for k in read_checkpoint(ckpt)[0])
    for opts in ({}, {"top_k": 4}, {"top_p": 0.8, "temperature": 1.5}):
        g = [torch.Generator().manual_seed(2) for _ in range(2)]
        a = fam.sample_result(5, conditioning=list(range(5)), guidance=2.0, generator=g[0], **opts)
        b = fam.sample_result(5, conditioning=list(range(5)), guidance=2.0, generator=g[1], kv_cache=False, **opts)
        assert a.sample.shape == (5, 3, 16, 16) and a.nfe == 3
        assert torch.equal(a.tokens, b.tokens), opts
        torch.testing.assert_close(a.sample, fam.tokenizer.decode_tokens(a.tokens).clamp(-1, 1))
    with pytest.raises(ValueError, match="steps must be 3"):
        fam.sample(2, steps=8)


def test_bad_token_model_configs_are_refused(root):
    with pytest.raises(ValidationError, match="top_k 40 must be below vocab_size 32"):
        get_family("ar").Config(vocab_size=32, top_k=40)
    with pytest.raises(ValidationError, match="last scale must be the latent side"):
        get_family("msvq").Config(**{**TOK, "scales": [1, 2, 3]})
    with pytest.raises(ValidationError, match="strictly increasing"):
        get_family("msvq").Config(**{**TOK, "scales": [2, 1, 4]})
    with pytest.raises(VARError, match="needs its multi-scale tokenizer"):
        build_family("var", {})
    with pytest.raises(VARError, match="holds a 'vq' model"):
        build_family("var", {"autoencoder": str(root["vq"]["checkpoint"])})
    with pytest.raises(VARError, match="does not match its tokenizer"):
        build_family("var", {"autoencoder": str(root["msvq"]["checkpoint"]), "channels": 2, "image_size": 4,
                             "vocab_size": 32})
    with pytest.raises(RunError, match="holds discrete tokens"):  # a continuous family on token maps
        prepare(TrainRequest(dataset=root["ms_tokens"], train=dict(family="flow", model={"data": "latents"},
                                                                   steps=1, batch_size=4)), root["root"])


def test_ar_kv_cache_sampling_equals_uncached_without_training():
    """The fast-tier twin of the trained check above: an untrained (perturbed) AR transformer,
    class-conditioned with CFG and top-k / top-p, draws the same tokens with and without its KV cache."""
    fam = perturbed(build_family("ar", {"image_size": 4, "vocab_size": 16, "hidden": 16, "depth": 2, "heads": 2,
                                        "conditioning": "class", "num_classes": 3}))
    for opts in ({}, {"top_k": 4, "temperature": 0.9}, {"top_p": 0.8}):
        g = [torch.Generator().manual_seed(3) for _ in range(2)]
        a = fam.sample(4, conditioning=[0, 1, 2, 0], guidance=2.0, generator=g[0], **opts)
        b = fam.sample(4, conditioning=[0, 1, 2, 0], guidance=2.0, generator=g[1], kv_cache=False, **opts)
        assert a.shape == (4, 1, 4, 4) and torch.equal(a, b) and len(a.unique()) > 1, opts
