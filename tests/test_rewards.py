"""Reward and aesthetic scorers on tiny random models saved locally (open_clip local-dirs, a transformers
CLIPModel, BLIP towers), each checked against a computation written out here, plus the converters for the
published pickled checkpoints (read tensors-only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _eval_models import bert_tokenizer_folder, tiny_hf_clip
from _helpers import tiny_random_clip
from PIL import Image
from safetensors.torch import load_file, save_file

from imagegen.evaluate import rewards as R


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(5)]


PROMPTS = ["a red circle", "two dogs", "a photo of a cat", "a blue square", "a green star"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_random_clip(tmp_path_factory.mktemp("clip") / "tinyclip")


def _head(width, seed=0):
    torch.manual_seed(seed)
    return R.RewardMLP(width).eval()


def test_aesthetic_head_on_normalised_clip_embeddings(clip_dir, images, tmp_path):
    from imagegen.clip import encode_images, load_clip

    mlp = _head(16)
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), pth)  # the published format: a pickled state dict
    head = R.convert_aesthetic_checkpoint(pth, tmp_path / "aesthetic.safetensors")
    assert set(load_file(str(head))) == set(mlp.state_dict())
    scorer = R.AestheticScorer(clip_dir, head)
    got = scorer.score(images)
    # written out: L2-normalised embedding through the five affine layers (no activations)
    x = torch.from_numpy(encode_images(load_clip(clip_dir), images)).double()
    assert torch.allclose(x.norm(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-5)
    sd = {k: v.double() for k, v in mlp.state_dict().items()}
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    assert np.allclose(got, x.squeeze(1).numpy(), atol=1e-5)
    row = R.reward_scores(scorer, images, None, "world-smoke")
    assert row["prompt_set"] == "world-smoke" and row["model"]["head_sha256"] and row["interval"]["n_resamples"] == 1000
    # a pickled head is never loaded directly; a head of the wrong width is refused with the keys
    with pytest.raises(R.RewardWeightsError, match="convert it once"):
        R.AestheticScorer(clip_dir, pth)
    save_file(_head(8).state_dict(), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(R.RewardWeightsError, match="does not fit"):
        R.AestheticScorer(clip_dir, tmp_path / "narrow.safetensors")
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(R.RewardWeightsError, match="not an aesthetic-predictor head"):
        R.convert_aesthetic_checkpoint(tmp_path / "bad.pth", tmp_path / "bad.safetensors")


def test_hpsv2_is_the_open_clip_cosine_and_the_converter_roundtrips(clip_dir, images, tmp_path):
    from imagegen.clip import CONFIG_NAME, SAFE_WEIGHTS_NAME, clear_clip_cache, encode_images, encode_texts, load_clip

    scorer = R.HPSv2Scorer(clip_dir)
    got = scorer.score(images, PROMPTS)
    clip = load_clip(clip_dir)
    img, txt = encode_images(clip, images), encode_texts(clip, PROMPTS)
    want = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(img, txt)]
    assert np.allclose(got, want, atol=1e-5)
    # the published checkpoint: {"state_dict": {"module.<key>": tensor}} as torch.save wrote it
    folder = clip_dir.split(":", 1)[1]
    state = load_file(f"{folder}/{SAFE_WEIGHTS_NAME}")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "HPS_v2.1.pt")
    conv = tmp_path / "hps"
    conv.mkdir()
    (conv / CONFIG_NAME).write_text(open(f"{folder}/{CONFIG_NAME}").read())
    R.convert_hpsv2_checkpoint(tmp_path / "HPS_v2.1.pt", conv / SAFE_WEIGHTS_NAME)
    clear_clip_cache()
    again = R.HPSv2Scorer(f"local-dir:{conv}").score(images, PROMPTS)
    assert np.allclose(again, got, atol=1e-6)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(images, PROMPTS[:2])


def test_pickscore_is_the_scaled_clip_logit(images, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_hf_clip(tmp_path / "pick")
    scorer = R.PickScoreScorer(folder, batch_size=2)
    got = scorer.score(images, PROMPTS)
    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = proc(text=PROMPTS, images=images, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # logit_scale.exp() * cos, images x texts
    assert np.allclose(got, torch.diagonal(logits).numpy(), atol=1e-4)
    assert scorer.identity["weights"]["model.safetensors"]


# ------------------------------------------------------------------------------ ImageReward

V, L, H, IMG, PATCH = 32, 2, 2, 32, 16  # tiny BLIP ViT: width, blocks, heads, image size, patch size


def _original_imagereward_state(text_state, seed=0):
    """An ImageReward.pt-shaped state dict in BLIP's own names (vit.py's VisionTransformer: patch_embed,
    cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm; med.py's
    BertModel as text_encoder; the reward head as mlp), with random tensors."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    n_tok = (IMG // PATCH) ** 2 + 1
    sd = {"blip.visual_encoder.cls_token": r(1, 1, V), "blip.visual_encoder.pos_embed": r(1, n_tok, V),
          "blip.visual_encoder.patch_embed.proj.weight": r(V, 3, PATCH, PATCH),
          "blip.visual_encoder.patch_embed.proj.bias": r(V),
          "blip.visual_encoder.norm.weight": 1 + r(V), "blip.visual_encoder.norm.bias": r(V),
          "blip.vision_proj.weight": r(8, V), "blip.text_proj.weight": r(8, V)}  # unused by the reward
    for i in range(L):
        p = f"blip.visual_encoder.blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(V), p + "norm1.bias": r(V), p + "attn.qkv.weight": r(3 * V, V),
                   p + "attn.qkv.bias": r(3 * V), p + "attn.proj.weight": r(V, V), p + "attn.proj.bias": r(V),
                   p + "norm2.weight": 1 + r(V), p + "norm2.bias": r(V), p + "mlp.fc1.weight": r(4 * V, V),
                   p + "mlp.fc1.bias": r(4 * V), p + "mlp.fc2.weight": r(V, 4 * V), p + "mlp.fc2.bias": r(V)})
    for k, v in text_state.items():
        sd["blip.text_encoder." + k] = r(*v.shape)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    for k, v in R.RewardMLP(V).state_dict().items():
        sd["mlp." + k] = r(*v.shape)
    return sd


def _blip_vit_forward(sd, x):
    """BLIP's VisionTransformer forward written out on its own parameter names (pre-norm blocks)."""
    p = "blip.visual_encoder."
    t = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + sd[p + "pos_embed"]
    hd = V // H
    for i in range(L):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(t, (V,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = (h @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(x.shape[0], -1, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * hd ** -0.5, dim=-1) @ v
        t = t + a.transpose(1, 2).reshape(x.shape[0], -1, V) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        h = F.layer_norm(t, (V,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        t = t + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return F.layer_norm(t, (V,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)


def test_imagereward_converter_and_score(images, tmp_path):
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    tok_dir = bert_tokenizer_folder(tmp_path / "bert")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    med = {"vocab_size": len(tok), "hidden_size": V, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "max_position_embeddings": 64, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
           "add_cross_attention": True, "encoder_width": 768}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    text_cfg = BlipTextConfig(**{k: v for k, v in med.items() if k not in ("add_cross_attention", "encoder_width")},
                              encoder_hidden_size=V)
    sd = _original_imagereward_state(BlipTextModel(text_cfg, add_pooling_layer=False).state_dict())
    torch.save(sd, tmp_path / "ImageReward.pt")
    folder = R.convert_imagereward_checkpoint(tmp_path / "ImageReward.pt", tmp_path / "med_config.json", tok_dir,
                                              tmp_path / "imagereward", vit_width=V, vit_layers=L, vit_heads=H,
                                              image_size=IMG, patch_size=PATCH)
    cfg = json.loads((folder / R.IMAGEREWARD_CONFIG).read_text())
    assert "blip.vision_proj.weight" in cfg["source"]["dropped"]
    assert "blip.text_encoder.embeddings.position_ids" in cfg["source"]["dropped"]
    scorer = R.ImageRewardScorer(folder, batch_size=2)
    # the mapped image tower reproduces BLIP's ViT written out on the original names
    px = torch.stack([scorer.preprocess(im) for im in images])
    with torch.no_grad():
        ours = scorer.model.vision_model(pixel_values=px).last_hidden_state
    assert torch.allclose(ours, _blip_vit_forward(sd, px), atol=1e-4)
    # the reward: the text CLS (cross-attending the image tokens) through the head, then ImageReward's normalisation
    got = scorer.score(images, PROMPTS)
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        cls = scorer.model.text_encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                        encoder_hidden_states=ours,
                                        encoder_attention_mask=torch.ones(ours.shape[:2], dtype=torch.long)
                                        ).last_hidden_state[:, 0].double()
    x = cls
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"mlp.layers.{i}.weight"].double().T + sd[f"mlp.layers.{i}.bias"].double()
    assert np.allclose(got, ((x.squeeze(1) - R.IMAGEREWARD_MEAN) / R.IMAGEREWARD_STD).numpy(), atol=1e-4)
    row = R.reward_scores(scorer, images, PROMPTS, "test-prompts", n_resamples=50)
    assert row["metric"] == "ImageReward" and row["prompts_sha256"] and row["model"]["weights_sha256"]
    # a checkpoint missing a block is refused naming the key
    del sd["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(R.RewardWeightsError, match=r"encoder\.layers\.1\.self_attn\.qkv\.weight"):
        R.convert_imagereward_checkpoint(tmp_path / "broken.pt", tmp_path / "med_config.json", tok_dir,
                                         tmp_path / "broken", vit_width=V, vit_layers=L, vit_heads=H,
                                         image_size=IMG, patch_size=PATCH)


def test_one_aesthetic_head_module_serves_filter_and_evaluation(tmp_path):
    """The curation filter's predictor and the evaluation's reward head are one class: a head saved
    by one loads strictly into the other and gives the same score."""
    from imagegen.filters.aesthetic import build_predictor
    from imagegen.filters.aesthetic_mlp import AestheticMLP

    assert R.RewardMLP is AestheticMLP
    torch.manual_seed(3)
    filt = build_predictor("mlp", 16).eval()
    head = R.RewardMLP(16).eval()
    head.load_state_dict(filt.state_dict(), strict=True)
    x = torch.randn(5, 16)
    assert torch.equal(filt(x), head(x))
    assert head.input_size == 16
