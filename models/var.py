"""VAR, next-scale prediction (Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image
Generation via Next-Scale Prediction"), over the token maps of a multi-scale residual tokenizer
(models/msvq.py).

Trains on a token dataset of an ``msvq`` run (imagegen/latents.py; each sample the K token maps
packed into [K, S, S]).  The sequence is all maps, coarse to fine: r_1 (s_1^2 tokens), ...,
r_K (s_K^2).  The input at scale 1 is the condition token (class / pooled text / learned null,
dropped to the null one with probability ``cond_dropout``), and at scale k+1 the tokenizer's
partial reconstruction after scales 1..k, area-downsampled to s_{k+1} (``next_scale_inputs``;
the frozen tokenizer's codebook embeds the tokens), linearly mapped to the width, plus learned
position and scale embeddings.  A transformer with AdaLN conditioning and the **block-causal**
mask (a token attends to every token of its own and all coarser scales) predicts every map of
the sequence in one pass (cross-entropy).

Sampling takes K steps, one per scale: all s_k^2 tokens of a scale are drawn in parallel
(temperature / top-k / top-p, classifier-free guidance on the logits over a doubled batch), the
running reconstruction f_hat grows by the tokenizer's up(codebook[r_k]), and the keys/values of
each scale are cached, so step k only runs the s_k^2 new tokens (that is what the block-causal
mask allows).  The tokenizer decodes f_hat to images.  It is frozen, held outside the module
tree (not trained, not checkpointed) and loaded from ``autoencoder`` (the run layer fills it
from the token dataset), also for inference: VAR cannot sample without its codebook.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.ar import TokenModelConfig, sampling_setup
from models.base import Family, FamilyConfig, LossOut
from models.msvq import down, up
from models.nets.tokens import CondVector, KVCache, TokenTransformer, cfg_logits, sample_logits, token_ids
from models.samplers import SampleResult

_OPTIONS = ("temperature", "top_k", "top_p", "kv_cache")


class VARError(ValueError):
    """A VAR model that cannot be built on this tokenizer (says why)."""


class VARConfig(TokenModelConfig):
    channels: int = Field(4, ge=1, le=64, description="Number of scales K (filled from the token dataset)")


def block_causal_mask(scales: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """[L, L] bool, True where a token (row) may attend: every token of its own or a coarser scale."""
    level = torch.cat([torch.full((s * s,), k) for k, s in enumerate(scales)]).to(device)
    return level[:, None] >= level[None, :]


class VAR(Family):
    name: ClassVar[str] = "var"
    Config: ClassVar[type[FamilyConfig]] = VARConfig
    samplers: ClassVar[tuple[str, ...]] = ("next_scale",)
    default_sampler: ClassVar[str] = "next_scale"
    default_steps: ClassVar[int] = 1  # per instance: one step per scale (set in __init__)
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"next_scale": _OPTIONS}

    cfg: VARConfig

    def __init__(self, cfg: VARConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        if not c.autoencoder:
            raise VARError("VAR needs its multi-scale tokenizer: model.autoencoder (an msvq checkpoint; training on "
                           "a token dataset of an msvq run fills it in)")
        from models.checkpoint import load_family

        tok = load_family(str(c.autoencoder))
        if tok.name != "msvq":
            raise VARError(f"VAR predicts the scales of an 'msvq' tokenizer; {c.autoencoder} holds a {tok.name!r} model")
        self.scales: tuple[int, ...] = tuple(tok.scales)
        if (len(self.scales), self.scales[-1], tok.vocab_size) != (c.channels, c.image_size, c.vocab_size):
            raise VARError(f"VAR config (channels={c.channels} scales, image_size={c.image_size}, vocab_size="
                           f"{c.vocab_size}) does not match its tokenizer (scales {list(self.scales)}, vocabulary "
                           f"{tok.vocab_size}); train on that tokenizer's token dataset")
        object.__setattr__(self, "_autoencoder", tok)  # not a submodule: no optimizer, EMA or checkpoint
        self.default_steps = len(self.scales)
        self.lengths = [s * s for s in self.scales]
        L = sum(self.lengths)
        self.register_buffer("mask", block_causal_mask(self.scales), persistent=False)
        self.register_buffer("level", torch.cat([torch.full((n,), k) for k, n in enumerate(self.lengths)]),
                             persistent=False)
        self.cond_embed = CondVector(c.conditioning, c.num_classes, self.text_dim, c.hidden)
        self.word_embed = nn.Linear(tok.cfg.code_dim, c.hidden)
        self.pos = nn.Parameter(torch.randn(1, L, c.hidden) * 0.02)
        self.level_embed = nn.Embedding(len(self.scales), c.hidden)
        self.transformer = TokenTransformer(c.hidden, c.depth, c.heads, c.mlp_ratio, adaln=True)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    @property
    def tokenizer(self) -> Any:
        return self.__dict__["_autoencoder"]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        self.tokenizer._apply(fn, recurse)  # moved with the model (its codebook embeds the inputs)
        return out

    def _embed(self, x: Tensor, start: int) -> Tensor:
        """Add position and scale embeddings to the hidden inputs of positions start..start+n."""
        n = x.shape[1]
        return x + self.pos[:, start:start + n] + self.level_embed(self.level[start:start + n])[None]

    def inputs(self, maps: list[Tensor], c: Tensor) -> Tensor:
        """Teacher-forcing inputs [B, L, hidden] for the token maps ``maps`` (scale 1: the condition)."""
        B = c.shape[0]
        first = c[:, None].expand(B, self.lengths[0], -1)
        with torch.no_grad():
            prev = self.tokenizer.next_scale_inputs(maps)
        rest = [self.word_embed(p.flatten(2).transpose(1, 2).to(c.dtype)) for p in prev]
        return self._embed(torch.cat([first, *rest], 1), 0)

    def logits(self, maps: list[Tensor], cond: dict[str, Tensor]) -> Tensor:
        """[B, L, vocab] logits of every scale's tokens, each from the coarser scales only."""
        c = self.cond_embed(cond, maps[0].shape[0], maps[0].device)
        return self.head(self.transformer(self.inputs(maps, c), c, mask=self.mask))

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        packed = token_ids(self.check_images(batch), self.cfg.vocab_size, "VAR.loss")
        maps = self.tokenizer.unpack(packed)
        target = torch.cat([m.flatten(1) for m in maps], 1)
        logits = self.logits(maps, self.training_condition(batch, generator))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        with torch.no_grad():
            hit = (logits.argmax(-1) == target).float()
            logs = {"accuracy": float(hit.mean()), "nll": float(loss.detach()),
                    "accuracy_last_scale": float(hit[:, -self.lengths[-1]:].mean())}
        return LossOut({"model": loss}, logs)

    # ------------------------------------------------------------------ sampling

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """K steps, one per scale; images decoded by the tokenizer (``x_T`` is unused)."""
        sampler, steps = self._check_sampling(sampler, steps, guidance, conditioning, negative, options)
        K = len(self.scales)
        if steps != K:
            raise ValueError(f"VAR.sample: next-scale sampling takes one step per scale, steps must be {K} (or "
                             f"None), got {steps}")
        cond, rows, knobs, use_cache = sampling_setup(self, n, conditioning, negative, guidance, options, "VAR.sample")
        dev, side = self.device, self.scales[-1]
        codebook = self.tokenizer.codebook
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                cvec = self.cond_embed(cond, rows, dev)
                cache = KVCache() if use_cache else None
                f_hat = torch.zeros(rows, codebook.shape[1], side, side, device=dev)
                seq: list[Tensor] = []
                maps: list[Tensor] = []
                start = 0
                for k, s in enumerate(self.scales):
                    if k == 0:
                        h = cvec[:, None].expand(rows, s * s, -1)
                    else:
                        h = self.word_embed(down(f_hat, s).flatten(2).transpose(1, 2))
                    seq.append(self._embed(h, start))
                    if cache is not None:
                        out = self.transformer(seq[-1], cvec, cache=cache)
                    else:  # recompute every scale so far under the block-causal mask
                        end = start + s * s
                        out = self.transformer(torch.cat(seq, 1), cvec, mask=self.mask[:end, :end])[:, start:]
                    logits = cfg_logits(self.head(out), guidance)
                    r = sample_logits(logits, generator, **knobs).view(n, s, s)
                    maps.append(r)
                    r_all = r.repeat(2, 1, 1) if guidance != 1.0 else r
                    f_hat = f_hat + up(codebook[r_all].permute(0, 3, 1, 2), side)
                    start += s * s
                images = self.tokenizer.decoder(f_hat[:n]).clamp(-1, 1)
        finally:
            self.train(was)
        res = SampleResult(images, K)
        res.tokens = self.tokenizer.pack(maps)  # type: ignore[attr-defined]
        return res
