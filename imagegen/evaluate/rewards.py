"""Reward and aesthetic models as evaluation metrics: ImageReward, HPSv2, PickScore and the LAION
aesthetic predictor, each through the open_clip / transformers architecture it was trained on,
weights by path (safetensors), with converters for the published pickled checkpoints that read
tensors only (``torch.load(weights_only=True)``, run once on a machine you trust).

| scorer | architecture | score | published weights |
| --- | --- | --- | --- |
| :class:`ImageRewardScorer` (Xu et al. 2023) | BLIP ViT-L/16 image tower + BERT-base with cross-attention, CLS -> 5-layer linear head | ``(head(CLS) - 0.16717362830052426) / 1.0333394966054072`` | ``ImageReward.pt`` + ``med_config.json`` (THUDM/ImageReward) |
| :class:`HPSv2Scorer` (Wu et al. 2023) | open_clip ViT-H-14 fine-tuned | ``cos(image, text)`` (open_clip's normalised features) | ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (xswu/HPSv2) |
| :class:`PickScoreScorer` (Kirstain et al. 2023) | transformers ``CLIPModel`` (CLIP-H/14) | ``logit_scale.exp() * cos(image, text)`` | ``yuvalkirstain/PickScore_v1`` (+ processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) |
| :class:`AestheticScorer` (LAION improved aesthetic predictor) | open_clip ViT-L-14 ``openai`` image embedding (L2-normalised) -> 5-layer linear head | the head's output (~1..10) | ``sac+logos+ava1-l14-linearMSE.pth`` (christophschuhmann/improved-aesthetic-predictor) |

The heads of ImageReward and the aesthetic predictor are the same module (``Linear(D,1024),
Dropout(0.2), Linear(1024,128), Dropout(0.2), Linear(128,64), Dropout(0.1), Linear(64,16),
Linear(16,1)``: the ReLUs are commented out in both published definitions, so the head is affine;
state-dict keys ``layers.{0,2,4,6,7}``): :class:`RewardMLP`, which is the curation filter's
:class:`imagegen.filters.aesthetic_mlp.AestheticMLP` (one module serves both).

Every score row names the model (its identity: architecture, weights files and sha256) and the
prompt set the images were generated from (:func:`reward_scores`).  Scores are per image, so
:func:`imagegen.evaluate.bootstrap.bootstrap_mean_ci` gives their interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from imagegen.filters.aesthetic_mlp import AestheticMLP
from imagegen.hashing import file_sha256, stable_hash

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_CONFIG = "imagereward_config.json"
WEIGHTS = "model.safetensors"


class RewardWeightsError(ValueError):
    """A reward model's weights file is missing, pickled, or does not fit the architecture."""


class Scorer(Protocol):
    name: str
    identity: dict[str, Any]

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray: ...


RewardMLP = AestheticMLP
"""The linear head shared by ImageReward and the LAION aesthetic predictor (keys ``layers.N``): the
curation filter's module, :class:`imagegen.filters.aesthetic_mlp.AestheticMLP`, one definition."""


# ------------------------------------------------------------------------------ loading helpers


def _safetensors(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise RewardWeightsError(f"{what}: weights file {p} does not exist")
    if p.suffix != ".safetensors":
        raise RewardWeightsError(f"{what}: {p} is not a .safetensors file; pickled checkpoints are never loaded "
                                 f"directly: convert it once with this module's convert_* function")
    return p


def _fit(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` strictly; a mismatch raises RewardWeightsError naming the keys."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise RewardWeightsError(f"{what} does not fit the architecture: {str(exc)[:600]}") from None
    if missing or unexpected:
        raise RewardWeightsError(f"{what} does not fit the architecture: missing {sorted(missing)[:8]}"
                                 f"{'...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
                                 f"{'...' if len(unexpected) > 8 else ''}")


def _load_state(path: Path, module: torch.nn.Module, what: str) -> None:
    from safetensors.torch import load_file

    _fit(module, load_file(str(path)), f"{what}: {path}")


def _read_pickled_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A published ``.pt``/``.pth`` state dict read with torch's tensors-only loader."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RewardWeightsError(f"checkpoint {p} does not exist")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RewardWeightsError(f"{p} is not a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v.contiguous() for k, v in obj.items()}


def _save(state: dict[str, torch.Tensor], out: Path) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out)
    return out


def _rgb(images: Sequence[Image.Image | str | Path]) -> list[Image.Image]:
    from imagegen.evaluate.images import open_rgb

    return [im.convert("RGB") if isinstance(im, Image.Image) else open_rgb(im) for im in images]


def _check_pairs(images: Sequence[Any], prompts: Sequence[str] | None, need_prompts: bool) -> None:
    if not len(images):
        raise ValueError("no images to score")
    if need_prompts:
        if prompts is None or isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image")
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")


# ------------------------------------------------------------------------------ LAION aesthetic


class AestheticScorer:
    """LAION's improved aesthetic predictor: the head on L2-normalised CLIP image embeddings.

    ``clip_spec``: any :func:`imagegen.clip.load_clip` spec (published: ``ViT-L-14:openai``);
    ``head``: the head's safetensors (:func:`convert_aesthetic_checkpoint` makes it from the
    published ``.pth``).  The head's input width must equal the CLIP embedding width.
    """

    def __init__(self, clip_spec: Any, head: str | Path, device: str = "cpu", batch_size: int = 64) -> None:
        from imagegen.clip import load_clip

        path = _safetensors(head, "aesthetic head")
        self.clip = load_clip(clip_spec, device)
        self.mlp = RewardMLP(self.clip.embed_dim)
        _load_state(path, self.mlp, f"aesthetic head (CLIP width {self.clip.embed_dim})")
        self.mlp = self.mlp.eval().to(device)
        self.device, self.batch_size = device, batch_size
        self.name = "LAION-aesthetic"
        self.identity = {"scorer": self.name, "clip": dict(self.clip.identity), "head_file": str(path),
                         "head_sha256": file_sha256(path)}

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image | str | Path], prompts: Sequence[str] | None = None) -> np.ndarray:
        from imagegen.clip import encode_images

        _check_pairs(images, prompts, need_prompts=False)
        emb = encode_images(self.clip, _rgb(images), batch_size=self.batch_size)  # L2-normalised
        return self.mlp(torch.from_numpy(emb).to(self.device)).squeeze(1).double().cpu().numpy()


def convert_aesthetic_checkpoint(pth: str | Path, out: str | Path) -> Path:
    """Published ``sac+logos+ava1-l14-linearMSE.pth`` (a pickled state dict) -> head safetensors."""
    state = _read_pickled_tensors(pth)
    want = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    if set(state) != want:
        raise RewardWeightsError(f"{pth} is not an aesthetic-predictor head: keys {sorted(state)[:10]}")
    return _save(state, Path(out))


# ------------------------------------------------------------------------------------ HPSv2


class HPSv2Scorer:
    """HPSv2 / v2.1: the cosine of open_clip's normalised image and text features.

    ``clip_spec`` names the fine-tuned weights, e.g. ``ViT-H-14:/models/HPS_v2.1.safetensors``
    (:func:`convert_hpsv2_checkpoint` makes that file from the published ``.pt``).
    """

    def __init__(self, clip_spec: Any, device: str = "cpu", batch_size: int = 64, version: str = "v2.1") -> None:
        from imagegen.clip import load_clip

        self.clip = load_clip(clip_spec, device)
        self.batch_size = batch_size
        self.name = f"HPS{version}"
        self.identity = {"scorer": self.name, "clip": dict(self.clip.identity)}

    def score(self, images: Sequence[Image.Image | str | Path], prompts: Sequence[str]) -> np.ndarray:
        from imagegen.clip import encode_images, encode_texts

        _check_pairs(images, prompts, need_prompts=True)
        img = encode_images(self.clip, _rgb(images), batch_size=self.batch_size)
        txt = encode_texts(self.clip, list(prompts), batch_size=self.batch_size)
        return (img.astype(np.float64) * txt.astype(np.float64)).sum(axis=1)


def convert_hpsv2_checkpoint(pt: str | Path, out: str | Path) -> Path:
    """Published ``HPS_v2*_compressed.pt`` (``{"state_dict": ...}``, maybe ``module.``-prefixed) -> an
    open_clip safetensors file for the spec ``ViT-H-14:<out>``."""
    state = _read_pickled_tensors(pt)
    if "visual.proj" not in state and not any(k.startswith("visual.") for k in state):
        raise RewardWeightsError(f"{pt} does not look like an open_clip CLIP state dict (no visual.* keys)")
    return _save(state, Path(out))


# ---------------------------------------------------------------------------------- PickScore


class PickScoreScorer:
    """PickScore: ``logit_scale.exp() * cos`` of transformers ``CLIPModel`` image/text embeddings.

    ``model``: hub name or ``save_pretrained`` folder (published: ``yuvalkirstain/PickScore_v1``);
    ``processor``: the processor folder or name (published: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
    default: the model's own folder).
    """

    def __init__(self, model: str | Path, processor: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 32) -> None:
        from transformers import AutoProcessor, CLIPModel

        from imagegen.evaluate.hf_models import load_pretrained, load_processor, weights_identity

        self.model = load_pretrained(CLIPModel, model, what="PickScore weights", device=device)
        self.processor = load_processor(AutoProcessor, processor or model, what="PickScore processor")
        self.device, self.batch_size = device, batch_size
        self.name = "PickScore"
        self.identity = {"scorer": self.name, **weights_identity(model), "processor": str(processor or model)}

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image | str | Path], prompts: Sequence[str]) -> np.ndarray:
        _check_pairs(images, prompts, need_prompts=True)
        out = []
        scale = float(self.model.logit_scale.exp())
        for s in range(0, len(images), self.batch_size):
            ims = _rgb(images[s:s + self.batch_size])
            px = self.processor(images=ims, return_tensors="pt")["pixel_values"].to(self.device)
            tx = self.processor(text=list(prompts[s:s + self.batch_size]), padding=True, truncation=True,
                                return_tensors="pt")
            img = self._tensor(self.model.get_image_features(pixel_values=px))
            txt = self._tensor(self.model.get_text_features(input_ids=tx["input_ids"].to(self.device),
                                                            attention_mask=tx["attention_mask"].to(self.device)))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((scale * (img * txt).sum(-1)).double().cpu().numpy())
        return np.concatenate(out)


# -------------------------------------------------------------------------------- ImageReward


class ImageRewardModel(torch.nn.Module):
    """BLIP's image tower and cross-attending BERT (transformers' Blip modules) plus the reward head."""

    def __init__(self, vision_config: dict[str, Any], text_config: dict[str, Any]) -> None:
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        vc, tc = BlipVisionConfig(**vision_config), BlipTextConfig(**text_config)
        if tc.encoder_hidden_size != vc.hidden_size:
            raise RewardWeightsError(f"ImageReward config: text encoder_hidden_size {tc.encoder_hidden_size} must "
                                     f"equal the image tower width {vc.hidden_size}")
        self.vision_model = BlipVisionModel(vc)
        self.text_encoder = BlipTextModel(tc, add_pooling_layer=False)
        self.mlp = RewardMLP(tc.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return self.mlp(text.last_hidden_state[:, 0, :].float()).squeeze(1)


def imagereward_preprocess(size: int = 224):
    """ImageReward's image transform: shortest side to ``size`` (bicubic), centre crop, CLIP mean/std."""
    import torchvision.transforms as TF

    return TF.Compose([TF.Resize(size, interpolation=TF.InterpolationMode.BICUBIC), TF.CenterCrop(size),
                       TF.ToTensor(), TF.Normalize(CLIP_MEAN, CLIP_STD)])


class ImageRewardScorer:
    """ImageReward from a folder made by :func:`convert_imagereward_checkpoint` (or saved by
    :func:`save_imagereward`): ``imagereward_config.json``, ``model.safetensors`` and a BERT tokenizer."""

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = 16) -> None:
        from transformers import AutoTokenizer

        root = Path(folder).expanduser()
        cfg_path = root / IMAGEREWARD_CONFIG
        if not cfg_path.is_file():
            raise RewardWeightsError(f"ImageReward: {cfg_path} does not exist; make the folder with "
                                     f"convert_imagereward_checkpoint(ImageReward.pt, med_config.json, tokenizer, DIR)")
        cfg = json.loads(cfg_path.read_text())
        weights = _safetensors(root / WEIGHTS, "ImageReward")
        self.model = ImageRewardModel(cfg["vision_config"], cfg["text_config"])
        _load_state(weights, self.model, "ImageReward")
        self.model = self.model.eval().to(device).requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        self.mean, self.std = float(cfg.get("mean", IMAGEREWARD_MEAN)), float(cfg.get("std", IMAGEREWARD_STD))
        self.max_length = int(cfg.get("max_length", IMAGEREWARD_MAX_LENGTH))
        self.preprocess = imagereward_preprocess(int(cfg["vision_config"].get("image_size", 224)))
        self.device, self.batch_size = device, batch_size
        self.name = "ImageReward"
        self.identity = {"scorer": self.name, "folder": str(root), "weights_sha256": file_sha256(weights),
                         "config_sha256": file_sha256(cfg_path), "source": cfg.get("source")}

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image | str | Path], prompts: Sequence[str]) -> np.ndarray:
        _check_pairs(images, prompts, need_prompts=True)
        out = []
        for s in range(0, len(images), self.batch_size):
            px = torch.stack([self.preprocess(im) for im in _rgb(images[s:s + self.batch_size])]).to(self.device)
            tok = self.tokenizer(list(prompts[s:s + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            raw = self.model(px, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
            out.append(((raw - self.mean) / self.std).double().cpu().numpy())
        return np.concatenate(out)


def _blip_vit_key(k: str) -> str | None:
    """BLIP's ``VisionTransformer`` (timm-style) parameter name -> transformers' BlipVisionModel name."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if k in fixed:
        return fixed[k]
    parts = k.split(".")
    if parts[0] != "blocks" or len(parts) < 4:
        return None
    sub = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
           "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    mod = ".".join(parts[2:-1])
    if mod not in sub:
        return None
    return f"encoder.layers.{parts[1]}.{sub[mod]}.{parts[-1]}"


def imagereward_configs(med_config: dict[str, Any], *, vit_width: int = 1024, vit_layers: int = 24,
                        vit_heads: int = 16, image_size: int = 224, patch_size: int = 16) -> tuple[dict, dict]:
    """(BlipVisionConfig, BlipTextConfig) keyword dicts for ImageReward (BLIP 'large': ViT-L/16 at 224)."""
    vision = {"hidden_size": vit_width, "intermediate_size": 4 * vit_width, "num_hidden_layers": vit_layers,
              "num_attention_heads": vit_heads, "image_size": image_size, "patch_size": patch_size,
              "layer_norm_eps": 1e-6, "hidden_act": "gelu"}  # BLIP's ViT: LayerNorm(eps=1e-6), nn.GELU
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "pad_token_id")
    text = {k: med_config[k] for k in keys if k in med_config}
    text["encoder_hidden_size"] = vit_width  # BLIP sets encoder_width to the image tower's width
    return vision, text


def convert_imagereward_checkpoint(pt: str | Path, med_config: str | Path, tokenizer: str | Path,
                                   out_dir: str | Path, **vit: Any) -> Path:
    """Published ``ImageReward.pt`` + ``med_config.json`` + a BERT tokenizer folder -> a scorer folder.

    The checkpoint is read tensors-only; BLIP's ViT names are mapped to transformers' Blip names
    (``blocks.N.attn.qkv`` -> ``encoder.layers.N.self_attn.qkv`` ...), the BERT names are the same in
    both, the head keeps ``mlp.layers.N``; BLIP's contrastive projections and the ``position_ids``
    buffer are not used by the reward and are dropped (listed in the config's ``source.dropped``).
    The result is loaded strictly once, so a mismatch fails here, naming the keys.  ``tokenizer``:
    bert-base-uncased's files with BLIP's added ``[DEC]`` (bos) and ``[ENC]`` tokens (vocab 30524).
    """
    from transformers import AutoTokenizer

    state = _read_pickled_tensors(pt)
    med = json.loads(Path(med_config).read_text())
    vision_cfg, text_cfg = imagereward_configs(med, **vit)
    mapped: dict[str, torch.Tensor] = {}
    dropped = []
    for k, v in state.items():
        if k.startswith("blip.visual_encoder."):
            new = _blip_vit_key(k[len("blip.visual_encoder."):])
            if new is not None:
                mapped["vision_model." + new] = v
                continue
        elif k.startswith("blip.text_encoder.") and not k.endswith("position_ids"):
            mapped["text_encoder." + k[len("blip.text_encoder."):]] = v
            continue
        elif k.startswith("mlp.layers."):
            mapped[k] = v
            continue
        dropped.append(k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _fit(ImageRewardModel(vision_cfg, text_cfg), mapped, f"{pt} (mapped to the ImageReward architecture)")
    _save(mapped, out / WEIGHTS)
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(out / "tokenizer"))
    cfg = {"vision_config": vision_cfg, "text_config": text_cfg, "mean": IMAGEREWARD_MEAN, "std": IMAGEREWARD_STD,
           "max_length": IMAGEREWARD_MAX_LENGTH,
           "source": {"checkpoint": Path(pt).name, "checkpoint_sha256": file_sha256(pt),
                      "med_config_sha256": file_sha256(med_config), "dropped": sorted(dropped)}}
    (out / IMAGEREWARD_CONFIG).write_text(json.dumps(cfg, indent=1))
    return out


def save_imagereward(model: ImageRewardModel, vision_config: dict, text_config: dict, tokenizer: Any,
                     out_dir: str | Path) -> Path:
    """Write a scorer folder from a model in memory (the tests' tiny random ones)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(dict(model.state_dict()), out / WEIGHTS)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / IMAGEREWARD_CONFIG).write_text(json.dumps({"vision_config": vision_config, "text_config": text_config,
                                                       "mean": IMAGEREWARD_MEAN, "std": IMAGEREWARD_STD,
                                                       "max_length": IMAGEREWARD_MAX_LENGTH, "source": None}))
    return out


# ------------------------------------------------------------------------------------ rows


def reward_scores(scorer: Scorer, images: Sequence[Image.Image | str | Path], prompts: Sequence[str] | None,
                  prompt_set: str, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Score images and return one metric row: the scorer's name and identity, the prompt set (its
    name and a hash of the prompts), per-image scores, mean and a bootstrap interval."""
    from imagegen.evaluate.bootstrap import bootstrap_mean_ci

    if not prompt_set:
        raise ValueError("prompt_set must name the prompts the images were generated from (e.g. 'geneval-553')")
    scores = scorer.score(images, prompts) if prompts is not None else scorer.score(images)  # type: ignore[call-arg]
    row = {"metric": scorer.name, "model": scorer.identity, "prompt_set": prompt_set,
           "prompts_sha256": stable_hash(list(prompts), 64) if prompts is not None else None,
           "n": int(len(scores)), "mean": float(np.mean(scores)), "scores": scores}
    if len(scores) >= 2:
        row["interval"] = bootstrap_mean_ci(scores, n_resamples=n_resamples, seed=seed).as_dict()
    return row
