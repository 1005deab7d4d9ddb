"""A small, readable DDPM/ADM-style U-Net (Ho et al. 2020; Dhariwal & Nichol 2021).

Residual blocks (GroupNorm + SiLU, time/cond embedding injected as AdaGN scale+shift), self-
attention at chosen resolutions (plus cross-attention on text tokens if configured), strided-conv
downsampling, nearest+conv upsampling, skip connections at every block. The last conv of each
residual block, every attention output projection and the output conv start at zero, so a fresh
net outputs exactly 0 and each residual block starts as the identity on its main path.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems

from models.nets.layers import CondEmbedder, CrossAttention, Denoiser, DenoiserConfig, SelfAttention


class UNetConfig(DenoiserConfig):
    """U-Net widths per level, blocks per level, where attention runs."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
            head_channels=32, image_size=32,
        ),
        "S": dict(
            model_channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attention_resolutions=(16, 8),
        ),
        "B": dict(
            model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
            attention_resolutions=(32, 16, 8),
        ),
    }

    model_channels: int = Field(64, ge=8, le=1024, description="Channels at full resolution (base width)")
    channel_mult: tuple[int, ...] = Field(
        (1, 2, 2, 4), min_length=1, max_length=8, description="Width multiplier per resolution level"
    )
    num_res_blocks: int = Field(2, ge=1, le=8, description="Residual blocks per level on the way down")
    attention_resolutions: tuple[int, ...] = Field(
        (16, 8), description="Feature-map sides (pixels) at which attention blocks are inserted"
    )
    head_channels: int = Field(64, ge=4, le=1024, description="Channels per attention head")
    norm_groups: int = Field(32, ge=1, le=1024, description="GroupNorm groups")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if not p.can("channel_mult"):
            return
        if any(m < 1 for m in self.channel_mult):
            p.add(f"channel_mult entries must be >= 1, got {self.channel_mult}")
            return  # the levels below are not defined
        factor = 2 ** (len(self.channel_mult) - 1)
        if p.can("image_size") and self.image_size % factor:
            p.add(f"image_size {self.image_size} must be divisible by {factor} "
                  f"(2 ** (len(channel_mult) - 1)) to downsample {len(self.channel_mult) - 1} times")
        sides = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        bad = [r for r in self.attention_resolutions if r not in sides]
        if p.can("image_size", "attention_resolutions") and bad:
            p.add(f"attention_resolutions {bad} are never reached; the levels are {sides} "
                  f"for image_size {self.image_size}")
        seen: dict[str, None] = {}  # one message per distinct problem, in level order
        for m, side in zip(self.channel_mult, sides):
            ch = self.model_channels * m
            if p.can("model_channels", "norm_groups") and ch % self.norm_groups:
                seen[f"{ch} channels are not divisible by norm_groups {self.norm_groups}"] = None
            attends = side in self.attention_resolutions or side == sides[-1]  # the middle always attends
            if (p.can("model_channels", "head_channels", "image_size", "attention_resolutions") and attends
                    and ch % self.head_channels):
                seen[f"{ch} channels at side {side} are not divisible by head_channels {self.head_channels}"] = None
        for msg in seen:
            p.add(msg)


def _conv_flops(batch: int, h: int, w: int, cin: int, cout: int, k: int) -> int:
    return 2 * batch * h * w * cin * cout * k * k


class ResBlock(nn.Module):
    """GN-SiLU-conv, AdaGN (emb -> scale, shift), SiLU-dropout-conv(zero init), plus skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.cin, self.cout, self.emb_dim = cin, cout, emb_dim
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h

    def flops(self, batch: int, h: int, w: int, ctx_len: int) -> tuple[int, int, int]:
        f = _conv_flops(batch, h, w, self.cin, self.cout, 3) + _conv_flops(batch, h, w, self.cout, self.cout, 3)
        f += 2 * batch * self.emb_dim * 2 * self.cout
        if self.cin != self.cout:
            f += _conv_flops(batch, h, w, self.cin, self.cout, 1)
        return f, h, w


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, then (optionally) cross-attention to text tokens."""

    def __init__(self, ch: int, heads: int, groups: int, text_dim: int, cross: bool) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.attn = SelfAttention(ch, heads, zero_out=True)
        self.cross: CrossAttention | None = None
        if cross:
            self.norm_c = nn.LayerNorm(ch)
            self.cross = CrossAttention(ch, text_dim, heads, zero_out=True)

    def forward(self, x: Tensor, emb: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        b, c, hh, ww = x.shape
        h = x + self.attn(self.norm(x).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
        if self.cross is not None and tokens is not None:
            seq = h.flatten(2).transpose(1, 2)
            seq = seq + self.cross(self.norm_c(seq), tokens, mask)
            h = seq.transpose(1, 2).reshape(b, c, hh, ww)
        return h

    def flops(self, batch: int, h: int, w: int, ctx_len: int) -> tuple[int, int, int]:
        f = self.attn.flops(batch, h * w)
        if self.cross is not None and ctx_len:
            f += self.cross.flops(batch, h * w, ctx_len)
        return f, h, w


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        return self.conv(x)

    def flops(self, batch: int, h: int, w: int, ctx_len: int) -> tuple[int, int, int]:
        return _conv_flops(batch, h // 2, w // 2, self.ch, self.ch, 3), h // 2, w // 2


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def flops(self, batch: int, h: int, w: int, ctx_len: int) -> tuple[int, int, int]:
        return _conv_flops(batch, 2 * h, 2 * w, self.ch, self.ch, 3), 2 * h, 2 * w


class UNet(Denoiser):
    """Common interface: ``forward(x [B,C,H,W], t [B], cond) -> [B, out_channels, H, W]``.

    ``down`` and ``up`` are lists of stages; each stage is a list of layers run in order. One skip
    is pushed after the input conv and after every down stage, and one popped (concatenated)
    before every up stage, as in ADM.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        self.cond_embed = CondEmbedder(emb_dim, mc, cfg.num_classes, cfg.text_dim, cfg.time_scale)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, g, cfg.dropout)

        def attn(ch: int) -> AttnBlock:
            return AttnBlock(ch, ch // cfg.head_channels, g, cfg.text_dim, cfg.cross_attention)

        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, ch, side = [mc], mc, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                stage = nn.ModuleList([res(ch, mc * mult)])
                ch = mc * mult
                if side in cfg.attention_resolutions:
                    stage.append(attn(ch))
                self.down.append(stage)
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_chs.append(ch)
                side //= 2

        self.mid = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                stage = nn.ModuleList([res(ch + skip_chs.pop(), mc * mult)])
                ch = mc * mult
                if side in cfg.attention_resolutions:
                    stage.append(attn(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    stage.append(Upsample(ch))
                    side *= 2
                self.up.append(stage)
        assert not skip_chs, "internal: skip bookkeeping is off"

        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.cfg.channel_mult) - 1)

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor | None] | None = None) -> Tensor:
        cond = self._check_inputs(x, t, cond)
        emb = self.cond_embed(t, cond)
        tokens, mask = cond.get("tokens"), cond.get("token_mask")
        h = self.conv_in(x)
        if tokens is not None:
            tokens = tokens.to(h.dtype)
        skips = [h]
        for stage in self.down:
            for layer in stage:
                h = layer(h, emb, tokens, mask)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb, tokens, mask)
        for stage in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in stage:
                h = layer(h, emb, tokens, mask)
        return self.conv_out(F.silu(self.norm_out(h)))

    def flops_per_forward(self, batch: int = 1, context_len: int = 77) -> int:
        """Matmul/conv FLOPs (2 per multiply-add) of one forward, walking the same stages as forward."""
        cfg = self.cfg
        ctx = context_len if cfg.cross_attention else 0
        s = cfg.image_size
        f = self.cond_embed.flops(batch) + _conv_flops(batch, s, s, cfg.in_channels, cfg.model_channels, 3)
        h = w = s
        for stage in [*self.down, self.mid, *self.up]:
            for layer in stage:
                df, h, w = layer.flops(batch, h, w, ctx)
                f += df
        f += _conv_flops(batch, s, s, self.conv_out.in_channels, cfg.out_channels, 3)
        return f
