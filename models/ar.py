"""An autoregressive raster-order transformer over a tokenizer's token grids (GPT-style, as the
second stage of VQGAN, Esser et al. 2021, and LlamaGen, Sun et al. 2024).

Trains on the same token datasets as MaskGIT (imagegen/latents.py with a ``vq``/``vqgan`` run:
each sample a ``[1, h, w]`` grid of token ids).  The grid is read in raster order t_1..t_L; a
causal transformer sees [c, t_1, ..., t_{L-1}] — c the condition token (class embedding, pooled
text embedding, or one learned token when unconditional; replaced by the null condition with
probability ``cond_dropout``) — and predicts t_1..t_L (cross-entropy, teacher forcing).

Sampling feeds one token at a time with a KV cache (each step attends to the cached keys and
values instead of recomputing the prefix; ``kv_cache=False`` recomputes it, for checking), with
classifier-free guidance on the logits (the conditional and unconditional rows run as one
doubled batch), temperature, top-k and nucleus (top-p) filtering.  L forward passes per sample;
token ids are decoded to images by the tokenizer (``autoencoder``), like any latent family.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems
from models.base import Family, FamilyConfig, LossOut
from models.nets.tokens import CondVector, KVCache, TokenTransformer, cfg_logits, sample_logits, token_ids
from models.samplers import SampleResult

_OPTIONS = ("temperature", "top_k", "top_p", "kv_cache")


class TokenModelConfig(FamilyConfig):
    """Fields of the transformer token models (the raster transformer here, VAR)."""

    builds_denoiser: ClassVar[bool] = False

    data: str = Field("latents", description="Always 'latents': a tokenizer's token dataset")  # type: ignore[assignment]
    text_tokens: bool = Field(False, description="Unused: the pooled caption embedding is the condition")
    vocab_size: int = Field(256, ge=2, le=1 << 20, description="Tokenizer codebook size (filled from the dataset)")
    hidden: int = Field(128, ge=8, le=8192, description="Transformer width")
    depth: int = Field(4, ge=1, le=128, description="Transformer layers")
    heads: int = Field(4, ge=1, le=128, description="Attention heads")
    mlp_ratio: float = Field(4.0, gt=0.0, le=16.0, description="MLP width / hidden")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Default sampling temperature")
    top_k: int = Field(0, ge=0, description="Default top-k filter (0 = off)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Default nucleus filter (1 = off)")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("data") and self.data != "latents":
            p.add("data must be 'latents' (a token dataset of a tokenizer run)")
        if p.can("hidden", "heads") and self.hidden % self.heads:
            p.add(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if p.can("top_k", "vocab_size") and self.top_k >= self.vocab_size:
            p.add(f"top_k {self.top_k} must be below vocab_size {self.vocab_size} (0 = off)")


class ARConfig(TokenModelConfig):
    channels: int = Field(1, ge=1, le=1, description="Token grids have one channel")


def sampling_setup(fam: Family, n: int, conditioning: Any, negative: Any, guidance: float, options: dict[str, Any],
                   where: str) -> tuple[dict[str, Tensor], int, dict[str, Any], bool]:
    """(condition dict, rows, filter knobs, use the KV cache) of a token model's sampling call: with
    guidance the conditional rows come first, then the unconditional ones (CFG in one forward)."""
    c = fam.cfg
    knobs = {"temperature": float(options.get("temperature", c.temperature)),
             "top_k": int(options.get("top_k", c.top_k)), "top_p": float(options.get("top_p", c.top_p))}
    cond = fam.null_condition(n) if conditioning is None else fam.condition_from(conditioning, n, where)
    if guidance != 1.0:
        uncond = fam.null_condition(n) if negative is None else fam.condition_from(negative, n, where)
        cond = {k: torch.cat([cond[k], uncond[k].to(cond[k].dtype)]) for k in cond}
    return cond, (2 * n if guidance != 1.0 else n), knobs, bool(options.get("kv_cache", True))


class AutoregressiveTransformer(Family):
    name: ClassVar[str] = "ar"
    Config: ClassVar[type[FamilyConfig]] = ARConfig
    samplers: ClassVar[tuple[str, ...]] = ("raster",)
    default_sampler: ClassVar[str] = "raster"
    default_steps: ClassVar[int] = 1  # per instance: one step per token (set in __init__)
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"raster": _OPTIONS}

    cfg: ARConfig

    def __init__(self, cfg: ARConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        self.length = c.image_size * c.image_size
        self.default_steps = self.length
        self.tok = nn.Embedding(c.vocab_size, c.hidden)
        self.cond_embed = CondVector(c.conditioning, c.num_classes, self.text_dim, c.hidden)
        self.pos = nn.Parameter(torch.randn(1, self.length, c.hidden) * 0.02)
        self.transformer = TokenTransformer(c.hidden, c.depth, c.heads, c.mlp_ratio)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    def logits(self, tokens: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Teacher forcing: [B, L] ids -> [B, L, vocab] logits, row i predicting token i from the
        condition and tokens < i."""
        B = tokens.shape[0]
        h = torch.cat([self.cond_embed(cond, B, tokens.device)[:, None], self.tok(tokens[:, :-1])], 1)
        return self.head(self.transformer(h + self.pos, causal=True))

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        tokens = token_ids(self.check_images(batch), self.cfg.vocab_size, "AutoregressiveTransformer.loss").flatten(1)
        cond = self.training_condition(batch, generator)
        logits = self.logits(tokens, cond)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        with torch.no_grad():
            acc = float((logits.argmax(-1) == tokens).float().mean())
        return LossOut({"model": loss}, {"accuracy": acc, "nll": float(loss.detach())})

    # ------------------------------------------------------------------ sampling

    def _next(self, tokens: Tensor, c: Tensor, cache: KVCache | None) -> Tensor:
        """Logits of the next token after ``tokens`` [B, i] (i may be 0) under condition vectors c."""
        i = tokens.shape[1]
        if cache is None:  # recompute the whole prefix
            h = torch.cat([c[:, None], self.tok(tokens)], 1) + self.pos[:, :i + 1]
            return self.head(self.transformer(h, causal=True)[:, -1])
        h = (c[:, None] if i == 0 else self.tok(tokens[:, -1:])) + self.pos[:, i:i + 1]
        return self.head(self.transformer(h, cache=cache)[:, -1])

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """One token per forward pass in raster order; returns decoded images when the tokenizer is
        known (``autoencoder``), else the token grid [n, 1, h, w] as floats.  ``x_T`` is unused
        (the randomness is the generator's)."""
        sampler, steps = self._check_sampling(sampler, steps, guidance, conditioning, negative, options)
        c = self.cfg
        if steps != self.length:
            raise ValueError(f"AutoregressiveTransformer.sample: raster sampling takes one step per token, "
                             f"steps must be {self.length} (or None), got {steps}")
        cond, rows, knobs, use_cache = sampling_setup(self, n, conditioning, negative, guidance, options,
                                                      "AutoregressiveTransformer.sample")
        dev = self.device
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                cvec = self.cond_embed(cond, rows, dev)
                cache = KVCache() if use_cache else None
                tokens = torch.zeros(rows, 0, dtype=torch.long, device=dev)
                for _ in range(self.length):
                    logits = cfg_logits(self._next(tokens, cvec, cache), guidance)
                    nxt = sample_logits(logits, generator, **knobs)
                    if guidance != 1.0:
                        nxt = nxt.repeat(2)  # both halves of the batch continue with the same token
                    tokens = torch.cat([tokens, nxt[:, None]], 1)
        finally:
            self.train(was)
        grid = tokens[:n].view(n, 1, c.image_size, c.image_size).float()
        out = self.decode_latents(grid) if c.autoencoder else grid
        return SampleResult(out, self.length)
