"""Pieces shared by the U-Net and the DiT: embeddings, attention, conditioning, the common config.

Both networks take the same ``forward(x, t, cond)`` so that a family (DDPM, EDM, flow matching)
can swap one for the other; everything that makes that interface the same lives here.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import Tensor, nn

from imagegen.checks import AllProblems, Problems

COND_KEYS = ("class", "pooled", "tokens", "token_mask")


# --------------------------------------------------------------------------------------------
# Config shared by both networks
# --------------------------------------------------------------------------------------------


class DenoiserConfig(AllProblems):
    """Fields every denoiser has; subclasses add their architecture and their named presets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    in_channels: int = Field(3, ge=1, le=64, description="Channels of the noisy input x")
    out_channels: int = Field(
        3, ge=1, le=128, description="Channels predicted (2 * in_channels for a learned variance)"
    )
    image_size: int = Field(64, ge=4, le=1024, description="Height = width of x, in pixels/latents")
    num_classes: int = Field(
        0, ge=0, description="Class labels 0..num_classes-1; index num_classes is the null class; 0 = none"
    )
    text_dim: int = Field(0, ge=0, description="Width of the text tower's pooled/token embeddings; 0 = none")
    cross_attention: bool = Field(False, description="Attend to text tokens (needs text_dim > 0)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability inside blocks")
    time_scale: float = Field(
        1.0, gt=0.0, description="t is multiplied by this before the sinusoidal embedding "
        "(e.g. 1000 for flow time in [0, 1], so the embedding's frequencies resolve it)"
    )

    def problems(self, p: Problems) -> None:
        """Every cross-field problem at once (imagegen/checks.py); subclasses add theirs."""
        super().problems(p)
        if p.can("cross_attention", "text_dim") and self.cross_attention and self.text_dim == 0:
            p.add("cross_attention=True needs text_dim > 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DenoiserConfig":
        """A named size (e.g. "tiny", "S", "B") with any field overridden; unknown names are refused."""
        if name not in cls.PRESETS:
            raise ValueError(
                f"{cls.__name__}.preset: unknown preset {name!r}; known: {sorted(cls.PRESETS)}"
            )
        return cls(**{**cls.PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# Positional / timestep embeddings
# --------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a real number per sample: [B] -> [B, dim] (float32).

    Formula from "Attention is all you need" as used by ADM/DiT: cos/sin at geometric frequencies
    1 .. 1/max_period. Computed in float32 since bf16 cannot resolve large timesteps.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must have shape [B], got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2D sin-cos position embedding [h*w, dim], row-major (as in MAE / DiT).

    Half the channels encode the row, half the column.
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, ys), _sincos_1d(dim // 2, xs)], dim=1)
    return emb.float()


def rope_2d(h: int, w: int, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables [h*w, head_dim] for 2D rotary embedding on a row-major token grid.

    The first half of each head's channels is rotated by the row index, the second half by the
    column index (axial RoPE, e.g. Heo et al. 2024 "Rotary position embedding for ViT"), so q.k
    depends only on the 2D offset between tokens.
    """
    if head_dim % 4:
        raise ValueError(f"rope_2d: head_dim must be divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ay = ys.reshape(-1, 1).double() * freqs[None]
    ax = xs.reshape(-1, 1).double() * freqs[None]
    ang = torch.cat([ay, ay, ax, ax], dim=1)  # pairs (i, i + quarter) share an angle within each half
    return ang.cos().float(), ang.sin().float()


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope_2d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k [B, heads, N, head_dim] with tables from :func:`rope_2d`."""
    row, col = x.chunk(2, dim=-1)
    rotated = torch.cat([_rotate_half(row), _rotate_half(col)], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Attention (all through scaled_dot_product_attention)
# --------------------------------------------------------------------------------------------


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention on tokens [B, N, dim], optionally with 2D RoPE on q and k."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, zero_out: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SelfAttention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if zero_out:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        q, k, v = (_split_heads(z, self.heads) for z in self.qkv(x).chunk(3, dim=-1))
        if rope is not None:
            q, k = apply_rope_2d(q, *rope), apply_rope_2d(k, *rope)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))

    def flops(self, batch: int, n: int) -> int:
        d = self.dim
        return 2 * batch * n * d * 3 * d + 4 * batch * n * n * d + 2 * batch * n * d * d


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys/values from text tokens, with a keep-mask on the tokens.

    A sample whose mask keeps no token (or a call without tokens) gets exactly zero output, so
    dropping the caption for classifier-free guidance needs no special null tokens.
    """

    def __init__(self, dim: int, ctx_dim: int, heads: int, zero_out: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.ctx_dim, self.heads = dim, ctx_dim, heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(ctx_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if zero_out:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> Tensor:
        q = _split_heads(self.q(x), self.heads)
        k, v = (_split_heads(z, self.heads) for z in self.kv(ctx).chunk(2, dim=-1))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(_merge_heads(out))
        # A row with no kept token would be softmax over nothing (NaN): let it attend to
        # everything, then zero its result.
        any_kept = mask.any(dim=1)
        safe = mask | ~any_kept[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None, None, :])
        out = out * any_kept[:, None, None, None].to(out.dtype)
        # proj's bias would otherwise leak into empty rows; apply it only where tokens were kept.
        y = F.linear(_merge_heads(out), self.proj.weight)
        return y + self.proj.bias.to(y.dtype) * any_kept[:, None, None].to(y.dtype)

    def flops(self, batch: int, n: int, ctx_len: int) -> int:
        d = self.dim
        return (
            2 * batch * n * d * d  # q
            + 2 * batch * ctx_len * self.ctx_dim * 2 * d  # k, v
            + 4 * batch * n * ctx_len * d  # scores and weighted sum
            + 2 * batch * n * d * d  # out projection
        )


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------


def check_cond(
    cond: Mapping[str, Tensor | None] | None, batch: int, cfg: DenoiserConfig, where: str
) -> dict[str, Tensor]:
    """Validate the conditioning dict against what the network was built for.

    Missing keys (or None) mean "unconditional" for that input (null class, no pooled text, no
    tokens). Keys the network cannot use are refused rather than silently ignored, because
    ignoring them would train an unconditional model by accident.
    """
    cond = {k: v for k, v in (cond or {}).items() if v is not None}
    unknown = set(cond) - set(COND_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown cond keys {sorted(unknown)}; allowed: {list(COND_KEYS)}")
    checking = not torch.compiler.is_compiling()
    if "class" in cond:
        c = cond["class"]
        if cfg.num_classes == 0:
            raise ValueError(f"{where}: cond['class'] given but the net has num_classes=0")
        if c.shape != (batch,) or c.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{where}: cond['class'] must be an integer tensor of shape [{batch}], "
                f"got {c.dtype} {tuple(c.shape)}"
            )
        if checking and c.numel() and (int(c.min()) < 0 or int(c.max()) > cfg.num_classes):
            raise ValueError(
                f"{where}: cond['class'] values must lie in [0, {cfg.num_classes}] "
                f"({cfg.num_classes} = null), got min {int(c.min())} max {int(c.max())}"
            )
    if "pooled" in cond:
        p = cond["pooled"]
        if cfg.text_dim == 0:
            raise ValueError(f"{where}: cond['pooled'] given but the net has text_dim=0")
        if p.shape != (batch, cfg.text_dim):
            raise ValueError(
                f"{where}: cond['pooled'] must have shape [{batch}, {cfg.text_dim}], got {tuple(p.shape)}"
            )
    if "token_mask" in cond and "tokens" not in cond:
        raise ValueError(f"{where}: cond['token_mask'] given without cond['tokens']")
    if "tokens" in cond:
        tok = cond["tokens"]
        if not cfg.cross_attention:
            raise ValueError(
                f"{where}: cond['tokens'] given but the net has cross_attention=False "
                "(drop the key, or build the net with cross_attention=True)"
            )
        if tok.ndim != 3 or tok.shape[0] != batch or tok.shape[2] != cfg.text_dim:
            raise ValueError(
                f"{where}: cond['tokens'] must have shape [{batch}, L, {cfg.text_dim}], got {tuple(tok.shape)}"
            )
        if "token_mask" in cond:
            m = cond["token_mask"]
            if m.dtype != torch.bool or m.shape != tok.shape[:2]:
                raise ValueError(
                    f"{where}: cond['token_mask'] must be bool of shape {tuple(tok.shape[:2])}, "
                    f"got {m.dtype} {tuple(m.shape)}"
                )
    return cond


class CondEmbedder(nn.Module):
    """One vector per sample: MLP(sinusoid(t)) + class embedding + MLP(pooled text).

    The class table has num_classes + 1 rows, the last being the learned null class used when the
    label is dropped (or not given).
    """

    def __init__(
        self, emb_dim: int, freq_dim: int, num_classes: int, text_dim: int, time_scale: float
    ) -> None:
        super().__init__()
        self.emb_dim, self.freq_dim, self.num_classes, self.text_dim = emb_dim, freq_dim, num_classes, text_dim
        self.time_scale = time_scale
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.pooled_mlp = (
            nn.Sequential(nn.Linear(text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if text_dim
            else None
        )

    def forward(self, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        w = self.t_mlp[0].weight
        emb = self.t_mlp(timestep_embedding(t * self.time_scale, self.freq_dim).to(w.dtype))
        if self.class_emb is not None:
            labels = cond.get("class")
            if labels is None:
                labels = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.class_emb(labels)
        if self.pooled_mlp is not None and "pooled" in cond:
            emb = emb + self.pooled_mlp(cond["pooled"].to(w.dtype))
        return emb

    def flops(self, batch: int) -> int:
        d = self.emb_dim
        f = 2 * batch * (self.freq_dim * d + d * d)
        if self.text_dim:
            f += 2 * batch * (self.text_dim * d + d * d)
        return f


class Denoiser(nn.Module):
    """Base of both networks: the shared input checks and the bookkeeping numbers."""

    cfg: DenoiserConfig

    @property
    def size_multiple(self) -> int:
        """Inputs may be any H x W whose sides are multiples of this (the patch, or the total
        downsampling): the square ``image_size`` is the configured size, not the only one."""
        return 1

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor | None] | None) -> dict[str, Tensor]:
        name = type(self).__name__
        c, s, m = self.cfg.in_channels, self.cfg.image_size, self.size_multiple
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % m or x.shape[3] % m or min(x.shape[2:]) < m:
            raise ValueError(f"{name}.forward: x must have shape [B, {c}, {s}, {s}] (or [B, {c}, H, W] with H, W "
                             f"multiples of {m}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"{name}.forward: t must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        return check_cond(cond, x.shape[0], self.cfg, f"{name}.forward")

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_forward(self, batch: int = 1, context_len: int = 77) -> int:  # pragma: no cover
        raise NotImplementedError
