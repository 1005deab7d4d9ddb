"""A small pre-norm transformer over discrete tokens, shared by the autoregressive token models
(models/ar.py: raster order, causal; models/var.py: next-scale, block-causal).

* ``TokenBlock``: self-attention + MLP, each pre-normed; with ``adaln`` the norms are modulated
  (shift, scale) and the residual branches gated by a per-sample condition vector (AdaLN, as in
  DiT and VAR), gates initialised to zero so every block starts as the identity.
* Attention takes an optional boolean ``mask`` ([L_q, L_k] or [B, 1, L_q, L_k], True = may
  attend) or ``causal=True``, and an optional :class:`KVCache`: the new tokens' keys/values are
  appended to the cache and the queries attend to everything cached so far (what sampling one
  token, or one scale, at a time needs: the past is never recomputed).
* ``sample_logits``: temperature, top-k and nucleus (top-p) filtering, then one inverse-CDF draw
  per row from the generator (so cached and uncached sampling draw the same tokens from the same
  uniforms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCache:
    """Keys/values per layer, grown along the sequence as tokens are fed in."""

    def __init__(self) -> None:
        self.k: list[Tensor | None] = []
        self.v: list[Tensor | None] = []

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    @property
    def length(self) -> int:
        return 0 if not self.k or self.k[0] is None else int(self.k[0].shape[2])


class TokenBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, adaln: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"TokenBlock: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if adaln else None
        if self.adaln is not None:
            nn.init.zeros_(self.adaln[-1].weight)
            nn.init.zeros_(self.adaln[-1].bias)

    def attend(self, x: Tensor, mask: Tensor | None, causal: bool, cache: KVCache | None, layer: int) -> Tensor:
        b, n, d = x.shape
        q, k, v = (z.view(b, n, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        if cache is not None:
            if causal and cache.length:
                raise ValueError("TokenBlock: causal=True with a non-empty cache; feed one token at a time "
                                 "(it attends to the whole cache) or pass an explicit mask")
            k, v = cache.extend(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, c: Tensor | None = None, mask: Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        if self.adaln is None:
            x = x + self.attend(self.norm1(x), mask, causal, cache, layer)
            return x + self.mlp(self.norm2(x))
        if c is None:
            raise ValueError("TokenBlock: an AdaLN block needs the condition vector c")
        sa, ca, ga, sm, cm, gm = (m[:, None] for m in self.adaln(c).chunk(6, -1))
        x = x + ga * self.attend(self.norm1(x) * (1 + ca) + sa, mask, causal, cache, layer)
        return x + gm * self.mlp(self.norm2(x) * (1 + cm) + sm)


class TokenTransformer(nn.Module):
    """``depth`` TokenBlocks and a final norm: hidden states [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, adaln: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TokenBlock(dim, heads, mlp_ratio, adaln) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if adaln else None
        if self.final_adaln is not None:
            nn.init.zeros_(self.final_adaln[-1].weight)
            nn.init.zeros_(self.final_adaln[-1].bias)

    def forward(self, h: Tensor, c: Tensor | None = None, mask: Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h, c, mask, causal, cache, i)
        h = self.norm(h)
        if self.final_adaln is not None:
            shift, scale = (m[:, None] for m in self.final_adaln(c).chunk(2, -1))
            h = h * (1 + scale) + shift
        return h


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits [..., V] / temperature with everything outside the top-k and outside the smallest
    set of tokens whose probability reaches top_p set to -inf (0 / 1.0 = no filtering)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_logits(logits: Tensor, generator: torch.Generator | None, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Tensor:
    """One token id per row of ``logits`` [..., V] (inverse-CDF draw from the filtered softmax)."""
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    g_dev = generator.device if generator is not None else flat.device
    u = torch.rand(flat.shape[0], 1, generator=generator, device=g_dev, dtype=torch.float64).to(flat.device)
    cdf = flat.double().cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(flat.shape[-1] - 1)
    return idx.view(probs.shape[:-1])


class CondVector(nn.Module):
    """The condition of a token model as one vector per sample: a class embedding (the last row
    is the null class), a linear map of the pooled text embedding, or one learned vector for an
    unconditional model."""

    def __init__(self, conditioning: str, num_classes: int, text_dim: int, dim: int) -> None:
        super().__init__()
        self.conditioning = conditioning
        if conditioning == "class":
            self.embed: nn.Module = nn.Embedding(num_classes + 1, dim)
        elif conditioning == "text":
            self.embed = nn.Linear(text_dim, dim)
        else:
            self.embed = nn.Embedding(1, dim)

    def forward(self, cond: dict[str, Tensor], n: int, device: torch.device) -> Tensor:
        if self.conditioning == "class":
            return self.embed(cond["class"])
        if self.conditioning == "text":
            return self.embed(cond["pooled"].to(self.embed.weight.dtype))
        return self.embed(torch.zeros(n, dtype=torch.long, device=device))


def token_ids(x: Tensor, vocab_size: int, where: str) -> Tensor:
    """A batch of token grids stored as float ids [B, C, h, w] -> LongTensor [B, C, h, w], refusing
    ids outside the vocabulary (a token dataset of another tokenizer)."""
    t = x.round().long()
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{where}: token ids must lie in [0, {vocab_size - 1}], got {lo}..{hi}; is this a token "
                         "dataset of the same tokenizer?")
    return t


def cfg_logits(logits: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance on the logits of a doubled batch (conditional rows first, then the
    unconditional ones): l_u + w (l_c - l_u); a plain batch is returned as it is (w = 1)."""
    if guidance == 1.0:
        return logits.float()
    lc, lu = logits.float().chunk(2)
    return lu + guidance * (lc - lu)
