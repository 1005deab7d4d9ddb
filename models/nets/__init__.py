"""Denoiser networks with one interface: ``net(x [B,C,H,W], t [B], cond) -> [B, out_channels, H, W]``.

``cond`` may hold "class" (LongTensor [B], num_classes = null), "pooled" ([B, text_dim]),
"tokens" ([B, L, text_dim]) and "token_mask" (bool [B, L], True = keep); a missing key means
unconditional for that input.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from models.nets.dit import DiT, DiTConfig
from models.nets.layers import Denoiser, DenoiserConfig
from models.nets.mmdit import MMDiT, MMDiTConfig
from models.nets.unet import UNet, UNetConfig

NET_KINDS: dict[str, tuple[type[DenoiserConfig], type[Denoiser]]] = {
    "unet": (UNetConfig, UNet),
    "dit": (DiTConfig, DiT),
    "mmdit": (MMDiTConfig, MMDiT),
}


def build_net(kind: Literal["unet", "dit", "mmdit"], cfg: DenoiserConfig | Mapping[str, Any]) -> Denoiser:
    """Build a network from its config (or a plain dict of that config's fields)."""
    if kind not in NET_KINDS:
        raise ValueError(f"build_net: unknown kind {kind!r}; known: {sorted(NET_KINDS)}")
    cfg_cls, net_cls = NET_KINDS[kind]
    if isinstance(cfg, Mapping):
        cfg = cfg_cls(**cfg)
    if not isinstance(cfg, cfg_cls):
        raise TypeError(f"build_net: kind {kind!r} needs a {cfg_cls.__name__}, got {type(cfg).__name__}")
    return net_cls(cfg)


__all__ = ["DiT", "DiTConfig", "MMDiT", "MMDiTConfig", "UNet", "UNetConfig", "Denoiser", "DenoiserConfig", "NET_KINDS", "build_net"]
