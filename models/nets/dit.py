"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify -> fixed 2D sin-cos positions (+ optional 2D RoPE) -> N blocks with AdaLN-Zero ->
adaLN final layer -> unpatchify. Conditioning vector c = t_emb + class_emb + MLP(pooled text);
optional cross-attention sub-block on text tokens, with its own AdaLN shift/scale/gate.
Every gate and the final linear start at zero, so a fresh net outputs exactly 0 and each block
starts as the identity (the paper's AdaLN-Zero).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems
from models.nets.layers import (
    CondEmbedder,
    CrossAttention,
    Denoiser,
    DenoiserConfig,
    SelfAttention,
    rope_2d,
    sincos_pos_embed_2d,
)


class DiTConfig(DenoiserConfig):
    """DiT size and patch; presets S and B match the paper (DiT-S/2 = preset "S", patch_size=2)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(hidden_size=64, depth=2, num_heads=2, patch_size=4, image_size=32),
        "S": dict(hidden_size=384, depth=12, num_heads=6),
        "B": dict(hidden_size=768, depth=12, num_heads=12),
    }

    hidden_size: int = Field(384, ge=8, le=8192, description="Token width")
    depth: int = Field(12, ge=1, le=128, description="Number of transformer blocks")
    num_heads: int = Field(6, ge=1, le=128, description="Attention heads")
    patch_size: int = Field(2, ge=1, le=64, description="Side of the square patch per token")
    mlp_ratio: float = Field(4.0, gt=0.0, le=16.0, description="MLP hidden width / hidden_size")
    freq_dim: int = Field(256, ge=8, le=4096, description="Width of the sinusoidal timestep features")
    rope: bool = Field(False, description="Also apply 2D rotary embedding to q/k in self-attention")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("image_size", "patch_size") and self.image_size % self.patch_size:
            p.add(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if p.can("hidden_size", "num_heads") and self.hidden_size % self.num_heads:
            p.add(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if p.can("hidden_size") and self.hidden_size % 4:
            p.add(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos)")
        elif p.can("rope", "hidden_size", "num_heads") and self.rope and (self.hidden_size // self.num_heads) % 4:
            p.add(f"rope=True needs head dim (hidden_size/num_heads = {self.hidden_size // self.num_heads}) "
                  "divisible by 4")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DiTBlock(nn.Module):
    """Self-attention (+ cross-attention) + MLP, each pre-normed, modulated and gated by c."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.dim = d
        self.mlp_hidden = int(d * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, self.mlp_hidden, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.cross: CrossAttention | None = None
        if cfg.cross_attention:
            self.norm_c = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.cross = CrossAttention(d, cfg.text_dim, cfg.num_heads)
        self.n_mod = 9 if self.cross is not None else 6
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, self.n_mod * d))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        tokens: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> Tensor:
        mods = self.adaLN(c).chunk(self.n_mod, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[:6]
        x = x + gate_a[:, None] * self.drop(self.attn(_modulate(self.norm1(x), shift_a, scale_a), rope))
        if self.cross is not None and tokens is not None:
            shift_c, scale_c, gate_c = mods[6:]
            h = self.cross(_modulate(self.norm_c(x), shift_c, scale_c), tokens, token_mask)
            x = x + gate_c[:, None] * self.drop(h)
        x = x + gate_m[:, None] * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))
        return x

    def flops(self, batch: int, n: int, ctx_len: int) -> int:
        d = self.dim
        f = 2 * batch * d * self.n_mod * d  # adaLN modulation
        f += self.attn.flops(batch, n)
        f += 2 * 2 * batch * n * d * self.mlp_hidden
        if self.cross is not None and ctx_len:
            f += self.cross.flops(batch, n, ctx_len)
        return f


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a (zero-initialised) linear to patch pixels."""

    def __init__(self, d: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, patch * patch * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(Denoiser):
    """Common interface: ``forward(x [B,C,H,W], t [B], cond) -> [B, out_channels, H, W]``."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, cfg.grid, cfg.grid)[None], persistent=False)
        if cfg.rope:
            cos, sin = rope_2d(cfg.grid, cfg.grid, d // cfg.num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.cond_embed = CondEmbedder(d, cfg.freq_dim, cfg.num_classes, cfg.text_dim, cfg.time_scale)
        self.blocks = self.make_blocks(cfg)
        self.final = FinalLayer(d, p, cfg.out_channels)
        self._init_weights()

    def make_blocks(self, cfg: DiTConfig) -> nn.ModuleList:
        return nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))

    def zero_modulations(self) -> None:
        """AdaLN-Zero: every block's modulation (hence its gates) starts at zero."""
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)

    def _init_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zeros on every gate/modulation/output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        ce = self.cond_embed
        for lin in (ce.t_mlp[0], ce.t_mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if ce.class_emb is not None:
            nn.init.normal_(ce.class_emb.weight, std=0.02)
        self.zero_modulations()
        for lin in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def size_multiple(self) -> int:
        return self.cfg.patch_size

    def unpatchify(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """[B, N, p*p*C] -> [B, C, H, W] for a token grid of ``grid`` = (rows, columns) (default square)."""
        gh, gw = grid if grid is not None else (self.cfg.grid, self.cfg.grid)
        b, p, c = x.shape[0], self.cfg.patch_size, self.cfg.out_channels
        x = x.reshape(b, gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, gh * p, gw * p)

    def grid_positions(self, gh: int, gw: int, device: torch.device
                       ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(sin-cos positions [1, gh*gw, d], RoPE tables or None) of a gh x gw token grid: the
        configured square grid's buffers, else built for this grid (same row/column formula, so a
        token at (row, column) has one position whatever the aspect ratio) and kept per device."""
        if gh == gw == self.cfg.grid:
            return self.pos_embed, ((self.rope_cos, self.rope_sin) if self.cfg.rope else None)
        cache = self.__dict__.setdefault("_grid_cache", {})
        key = (gh, gw, str(device))
        if key not in cache:
            d = self.cfg.hidden_size
            pos = sincos_pos_embed_2d(d, gh, gw)[None].to(device)
            rope = tuple(a.to(device) for a in rope_2d(gh, gw, d // self.cfg.num_heads)) if self.cfg.rope else None
            cache[key] = (pos, rope)
        return cache[key]

    def embed_patches(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None, tuple[int, int]]:
        """x [B, C, H, W] -> (tokens [B, N, d] with positions, RoPE tables or None, (rows, columns))."""
        p = self.cfg.patch_size
        grid = (x.shape[2] // p, x.shape[3] // p)
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        pos, rope = self.grid_positions(*grid, h.device)
        return h + pos.to(h.dtype), rope, grid

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor | None] | None = None) -> Tensor:
        cond = self._check_inputs(x, t, cond)
        h, rope, grid = self.embed_patches(x)
        c = self.cond_embed(t, cond)
        tokens, mask = cond.get("tokens"), cond.get("token_mask")
        if tokens is not None:
            tokens = tokens.to(h.dtype)
        for block in self.blocks:
            h = block(h, c, rope, tokens, mask)
        return self.unpatchify(self.final(h, c), grid)

    def flops_per_forward(self, batch: int = 1, context_len: int = 77) -> int:
        """Matmul/conv FLOPs (2 per multiply-add) of one forward; context_len counts if cross-attending."""
        cfg = self.cfg
        d, p, n = cfg.hidden_size, cfg.patch_size, cfg.grid**2
        ctx = context_len if cfg.cross_attention else 0
        f = 2 * batch * n * cfg.in_channels * p * p * d  # patchify conv
        f += self.cond_embed.flops(batch)
        f += sum(block.flops(batch, n, ctx) for block in self.blocks)
        f += 2 * batch * d * 2 * d + 2 * batch * n * d * p * p * cfg.out_channels  # final layer
        return f
