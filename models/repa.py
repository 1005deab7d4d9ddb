"""REPA, representation alignment (Yu et al. 2024, "Representation Alignment for Generation:
Training Diffusion Transformers Is Easier Than You Think"), as an option of DiT/MMDiT training.

The hidden tokens h_n of block ``layer`` (1-based) of the denoiser, computed on the noisy input,
are mapped by a small MLP projector (Linear-SiLU-Linear-SiLU-Linear, the paper's) to the width of
a frozen vision encoder's patch features y_n of the *clean* image, and pulled towards them:

    L_REPA = - mean_n cos(y_n, proj(h_n)),     L = L_denoise + weight * L_REPA

(paper eq. 8; weight 0.5 and the 8th of 28 blocks in the paper).  The encoder's patch grid is
resized to the denoiser's token grid (area / bilinear).  Only the blocks up to ``layer``, the
embeddings below them and the projector receive its gradient.

Encoders (``encoder``, frozen, held outside the module tree like the distillation teachers: not
trained, not checkpointed, not in the EMA, not loaded for inference):

* an open_clip spec (imagegen.clip: ``NAME:tag``, ``NAME:/file.safetensors``, ``hf-hub:``,
  ``local-dir:``; ``world`` = the embedded world's reference CLIP, resolved by the run layer):
  the image tower's last-block features (``forward_intermediates``: a ViT's patch tokens after
  ``ln_post``, a ResNet tower's last feature map);
* ``transformers:<folder or hub repo>``: any Hugging Face vision backbone (DINOv2, ViT, SigLIP
  vision ...) loaded with ``AutoModel`` from safetensors: ``last_hidden_state`` minus its
  class/register tokens.

For a latent family the clean images are the frozen autoencoder's decodings of the latents.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

TRANSFORMERS_PREFIX = "transformers:"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RepaError(ValueError):
    """A REPA setting that cannot work (says which and why)."""


class RepaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = Field(min_length=1, description="Frozen vision encoder: an open_clip spec, 'world' (the "
                         "reference CLIP of the world dataset) or 'transformers:<folder or hub repo>'")
    layer: int = Field(ge=1, le=128, description="Align the output tokens of this denoiser block (1-based)")
    weight: float = Field(0.5, gt=0.0, le=100.0, description="Weight of the alignment loss (paper: 0.5)")
    projector_dim: int = Field(2048, ge=8, le=16384, description="Hidden width of the MLP projector (paper: 2048)")


class VisionFeatures:
    """A frozen vision tower: images in [-1, 1] [B, 3, H, W] -> patch features [B, C, h, w]."""

    def __init__(self, spec: str, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        if spec.startswith(TRANSFORMERS_PREFIX):
            self._load_transformers(spec[len(TRANSFORMERS_PREFIX):].strip())
        else:
            self._load_open_clip(spec)

    def _load_open_clip(self, spec: str) -> None:
        from imagegen.clip import load_clip

        clip = load_clip(spec, self.device)
        visual = clip.model.visual
        if not hasattr(visual, "forward_intermediates"):
            raise RepaError(f"REPA encoder {spec!r}: open_clip image tower {type(visual).__name__} has no "
                            "forward_intermediates (patch features); use a ViT/ResNet tower or a transformers: model")
        from open_clip import get_model_preprocess_cfg

        pre = get_model_preprocess_cfg(clip.model)
        self.size = clip.image_size
        self.mean, self.std = tuple(pre.get("mean", IMAGENET_MEAN)), tuple(pre.get("std", IMAGENET_STD))

        def run(x: Tensor) -> Tensor:
            out = visual.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=True,
                                               output_fmt="NCHW")
            return out["image_intermediates"][-1]

        self._run: Callable[[Tensor], Tensor] = run
        self.dim = int(self._probe().shape[1])

    def _load_transformers(self, ref: str) -> None:
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(ref)
            model = AutoModel.from_pretrained(ref, use_safetensors=True).to(self.device).eval().requires_grad_(False)
        except (OSError, ValueError) as exc:
            raise RepaError(f"REPA encoder 'transformers:{ref}': cannot load a safetensors vision model ({exc})") from exc
        vision = getattr(config, "vision_config", config)
        if hasattr(model, "vision_model"):  # a CLIP/SigLIP-style pair: its image tower
            model = model.vision_model
        size = getattr(vision, "image_size", 224)
        self.size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.patch = int(getattr(vision, "patch_size", 16))
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(ref)
            self.mean, self.std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # no processor saved: ImageNet statistics (DINOv2's)

        def run(x: Tensor) -> Tensor:
            hidden = model(pixel_values=x).last_hidden_state
            g = self.size // self.patch
            patches = hidden[:, -g * g:]  # drop the class / register tokens in front
            return patches.transpose(1, 2).reshape(x.shape[0], -1, g, g)

        self._run = run
        self.dim = int(self._probe().shape[1])

    def _probe(self) -> Tensor:
        return self(torch.zeros(1, 3, self.size, self.size, device=self.device))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = (images.float().to(self.device) + 1) / 2
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return self._run((x - mean) / std).float()


@functools.lru_cache(maxsize=4)
def _cached(spec: str, device: str) -> VisionFeatures:
    return VisionFeatures(spec, device)


def get_vision_encoder(spec: str, device: str | torch.device = "cpu") -> VisionFeatures:
    """The shared frozen encoder for ``spec`` on ``device`` (loaded once per process)."""
    if spec.strip() == "world":
        raise RepaError("REPA encoder 'world' names the reference CLIP of an embedded-world dataset; the run layer "
                        "resolves it (train through imagegen.train.runs), or give an open_clip spec")
    return _cached(spec.strip(), str(torch.device(device)))


def resize_grid(feats: Tensor, side: int) -> Tensor:
    """[B, C, h, w] -> [B, C, side, side]: area averaging down, bilinear up."""
    if feats.shape[-1] == side and feats.shape[-2] == side:
        return feats
    mode = "area" if feats.shape[-1] >= side else "bilinear"
    return F.interpolate(feats, size=(side, side), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


class REPA(nn.Module):
    """The projector and the hook on the aligned block; ``loss(images)`` after the net's forward."""

    def __init__(self, cfg: RepaConfig, net: nn.Module, load_encoder: bool) -> None:
        super().__init__()
        self.cfg = cfg
        blocks = getattr(net, "blocks", None)
        width = getattr(getattr(net, "cfg", None), "hidden_size", None)
        if blocks is None or width is None:
            raise RepaError(f"REPA aligns transformer tokens; net {type(net).__name__} has no blocks/hidden_size "
                            "(use net='dit' or 'mmdit')")
        if cfg.layer > len(blocks):
            raise RepaError(f"REPA layer {cfg.layer} is beyond the net's {len(blocks)} blocks")
        self.width, self.grid = int(width), int(net.cfg.grid)
        self.projector: nn.Sequential | None = None
        object.__setattr__(self, "_encoder", None)
        if load_encoder:
            enc = get_vision_encoder(cfg.encoder)
            object.__setattr__(self, "_encoder", enc)  # not a submodule: never trained or checkpointed
            self.projector = self._make_projector(enc.dim)
        self._tokens: Tensor | None = None
        blocks[cfg.layer - 1].register_forward_hook(self._keep)

    def _make_projector(self, out_dim: int) -> nn.Sequential:
        d = self.cfg.projector_dim
        return nn.Sequential(nn.Linear(self.width, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, out_dim))

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:  # only training forwards; sampling keeps nothing
            self._tokens = output[0] if isinstance(output, tuple) else output

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = f"{prefix}projector.4.weight"
        if self.projector is None and key in state_dict:  # built for inference: shapes from the checkpoint
            self.projector = self._make_projector(int(state_dict[key].shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def encoder(self) -> VisionFeatures:
        enc = self.__dict__.get("_encoder")
        if enc is None:
            raise RepaError("REPA: this model was built for inference only (no vision encoder loaded)")
        return enc

    def loss(self, images: Tensor) -> Tensor:
        """-mean cos(encoder patch features of ``images``, projected tokens of the last forward)."""
        h = self._tokens
        self._tokens = None
        if h is None or self.projector is None:
            raise RepaError("REPA.loss: no tokens from the aligned block (call it right after a training forward)")
        with torch.no_grad():
            y = resize_grid(self.encoder(images), self.grid).to(h.device).flatten(2).transpose(1, 2)
        z = self.projector(h.float() if h.dtype != self.projector[0].weight.dtype else h)
        return -F.cosine_similarity(z.float(), y, dim=-1).mean()


def check_repa(cfg: RepaConfig | None, net: str, depth: int, where: str) -> None:
    if cfg is None:
        return
    if net not in ("dit", "mmdit"):
        raise ValueError(f"{where}: repa aligns transformer tokens; it needs net='dit' or 'mmdit', got {net!r}")
    if cfg.layer > depth:
        raise ValueError(f"{where}: repa.layer={cfg.layer} is beyond the net's depth {depth}")
