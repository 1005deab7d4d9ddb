"""MMDiT, the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", Sec. 4 and Fig. 2).

Two token streams — image patches and the caption's token sequence (linearly embedded to the
width) — each with its **own** weights (AdaLN modulation, qkv, output projection, MLP), meet in
**one joint attention** over the concatenated sequence [text; image]: every image token attends
to every kept text token and vice versa.  Both streams are modulated (shift, scale, gate) by the
same vector c = MLP(t) + class embedding + MLP(pooled text) (models/nets/layers.CondEmbedder).
Optional RMS normalisation of q and k per stream (SD3's QK-norm for stable training), 2D RoPE
on the image queries/keys only.  The last block's text stream stops after its qkv ("pre-only"):
its outputs would be discarded.  Gates and the final linear start at zero (AdaLN-Zero), so a
fresh net outputs exactly 0.  Padding tokens (``token_mask`` False) are never attended to; with
no tokens at all (unconditional, class or pooled-only conditioning, or a dropped caption) it is
a DiT with plain self-attention.

Same interface as the U-Net and the DiT: ``forward(x [B,C,H,W], t [B], cond) -> [B, out, H, W]``
with cond keys class / pooled / tokens / token_mask; ``cross_attention=True`` (set by the
family when it conditions on caption tokens) builds the text stream.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.nets.dit import DiT, DiTConfig, Mlp, _modulate
from models.nets.layers import apply_rope_2d


class MMDiTConfig(DiTConfig):
    """DiT sizes (the same presets) plus SD3's QK normalisation."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = DiTConfig.PRESETS
    qk_norm: bool = Field(True, description="RMS-normalise queries and keys per head (SD3)")


def _norm(norm: nn.Module, x: Tensor) -> Tensor:
    return norm(x.float()).to(x.dtype)  # RMS statistics in float32 (also under bf16 autocast)


class _Stream(nn.Module):
    """One modality's weights in a joint block: AdaLN, qkv, (output projection + MLP)."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool) -> None:
        super().__init__()
        d, dh = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
        self.pre_only = pre_only
        self.n_mod = 2 if pre_only else 6
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, self.n_mod * d))
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        # pre-only (the last block's text stream): keys and values only, its queries would be unused
        self.qkv = nn.Linear(d, (2 if pre_only else 3) * d)
        self.q_norm = nn.RMSNorm(dh, eps=1e-6) if cfg.qk_norm and not pre_only else nn.Identity()
        self.k_norm = nn.RMSNorm(dh, eps=1e-6) if cfg.qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(d, d)
            self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(d, int(d * cfg.mlp_ratio), cfg.dropout)
            self.drop = nn.Dropout(cfg.dropout)

    def qkv_heads(self, x: Tensor, mods: tuple[Tensor, ...], heads: int) -> tuple[Tensor | None, Tensor, Tensor]:
        b, n, d = x.shape
        parts = [z.view(b, n, heads, d // heads).transpose(1, 2)
                 for z in self.qkv(_modulate(self.norm1(x), mods[0], mods[1])).chunk(2 if self.pre_only else 3, -1)]
        q = None if self.pre_only else _norm(self.q_norm, parts.pop(0))
        return q, _norm(self.k_norm, parts[0]), parts[1]

    def finish(self, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        _, _, gate_a, shift_m, scale_m, gate_m = mods
        x = x + gate_a[:, None] * self.drop(self.proj(attn))
        return x + gate_m[:, None] * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, text: bool, last: bool) -> None:
        super().__init__()
        self.heads, self.dim = cfg.num_heads, cfg.hidden_size
        self.mlp_hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        self.image = _Stream(cfg, pre_only=False)
        self.text = _Stream(cfg, pre_only=last) if text else None

    def forward(self, x: Tensor, ctx: Tensor | None, c: Tensor, rope: tuple[Tensor, Tensor] | None,
                keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
        mods_x = self.image.adaLN(c).chunk(6, dim=-1)
        q, k, v = self.image.qkv_heads(x, mods_x, self.heads)
        if rope is not None:
            q, k = apply_rope_2d(q, *rope), apply_rope_2d(k, *rope)
        n_txt = 0
        mask = None
        if ctx is not None and self.text is not None:
            mods_c = self.text.adaLN(c).chunk(self.text.n_mod, dim=-1)
            qc, kc, vc = self.text.qkv_heads(ctx, mods_c, self.heads)
            k, v = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
            if qc is not None:
                q, n_txt = torch.cat([qc, q], 2), ctx.shape[1]
            if keep is not None:  # text padding is never a key; image keys always are
                mask = torch.cat([keep, keep.new_ones(keep.shape[0], x.shape[1])], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, self.dim)
        x = self.image.finish(x, out[:, n_txt:], mods_x)
        if n_txt and not self.text.pre_only:
            return x, self.text.finish(ctx, out[:, :n_txt], mods_c)
        return x, None

    def flops(self, batch: int, n: int, ctx_len: int) -> int:
        d, B = self.dim, batch
        f = 2 * B * d * 6 * d + 2 * B * n * d * 3 * d + 2 * B * n * d * d + 4 * B * n * d * self.mlp_hidden
        if self.text is None or not ctx_len:
            return f + 4 * B * n * n * d
        if self.text.pre_only:  # text keys/values only; image queries over both
            return f + 2 * B * d * 2 * d + 2 * B * ctx_len * d * 2 * d + 4 * B * n * (n + ctx_len) * d
        f += 2 * B * d * 6 * d + 2 * B * ctx_len * d * 3 * d + 2 * B * ctx_len * d * d
        return f + 4 * B * ctx_len * d * self.mlp_hidden + 4 * B * (n + ctx_len) ** 2 * d


class MMDiT(DiT):
    """The DiT's patchify / positions / conditioning / final layer around joint-attention blocks."""

    cfg: MMDiTConfig

    def make_blocks(self, cfg: DiTConfig) -> nn.ModuleList:
        assert isinstance(cfg, MMDiTConfig)
        self.context_embed = nn.Linear(cfg.text_dim, cfg.hidden_size) if cfg.cross_attention else None
        return nn.ModuleList(JointBlock(cfg, cfg.cross_attention, i == cfg.depth - 1) for i in range(cfg.depth))

    def zero_modulations(self) -> None:
        for block in self.blocks:
            for stream in (block.image, block.text):
                if stream is not None:
                    nn.init.zeros_(stream.adaLN[-1].weight)
                    nn.init.zeros_(stream.adaLN[-1].bias)

    def joint_forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor | None] | None = None
                      ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(image tokens after the last block, text tokens after the last full block or None, c)."""
        cond = self._check_inputs(x, t, cond)
        h, rope, _ = self.embed_patches(x)
        c = self.cond_embed(t, cond)
        tokens, keep = cond.get("tokens"), cond.get("token_mask")
        ctx = self.context_embed(tokens.to(h.dtype)) if tokens is not None else None
        last_ctx = ctx
        for block in self.blocks:
            h, ctx = block(h, ctx, c, rope, keep)
            last_ctx = ctx if ctx is not None else last_ctx
        return h, last_ctx, c

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor | None] | None = None) -> Tensor:
        h, _, c = self.joint_forward(x, t, cond)
        p = self.cfg.patch_size
        return self.unpatchify(self.final(h, c), (x.shape[2] // p, x.shape[3] // p))

    def flops_per_forward(self, batch: int = 1, context_len: int = 77) -> int:
        ctx = context_len if self.cfg.cross_attention else 0
        return super().flops_per_forward(batch, context_len) + 2 * batch * ctx * self.cfg.text_dim * self.cfg.hidden_size
