"""A masked-token generator (MaskGIT, Chang et al. 2022) over the token grids of a tokenizer run.

Trains on a token dataset (imagegen/latents.py with a ``vq`` run: each sample a ``[1, h, w]``
grid of token ids).  A bidirectional transformer sees the grid with a random subset replaced by
[MASK] — the masked share drawn from the cosine schedule gamma(r) = cos(pi r / 2), r ~ U(0, 1) —
plus one condition token in front (class embedding, pooled text embedding, or the learned null
condition), and is trained with cross-entropy on the masked positions.  Sampling starts fully
masked and takes ``steps`` parallel decoding steps: sample every masked position (temperature,
classifier-free guidance on the logits), then re-mask the least confident ones so that
gamma(t / T) of the grid stays masked, with confidence noise annealed to zero (paper Sec. 3.2).
Token ids are decoded to images by the tokenizer (``autoencoder``), like any latent family.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems
from models.base import Family, FamilyConfig, LossOut, rand
from models.samplers import SampleResult


class MaskGITConfig(FamilyConfig):
    builds_denoiser: ClassVar[bool] = False

    data: str = Field("latents", description="Always 'latents': token grids")  # type: ignore[assignment]
    channels: int = Field(1, ge=1, le=1, description="Token grids have one channel")
    vocab_size: int = Field(256, ge=2, le=1 << 20, description="Tokenizer codebook size (filled from the dataset)")
    hidden: int = Field(128, ge=8, le=4096, description="Transformer width")
    depth: int = Field(4, ge=1, le=64, description="Transformer layers")
    heads: int = Field(4, ge=1, le=64, description="Attention heads")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature")
    confidence_noise: float = Field(4.5, ge=0.0, le=100.0, description="Gumbel noise on confidences at step 0 "
                                    "(annealed to 0; the paper's choice_temperature)")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("data") and self.data != "latents":
            p.add("data must be 'latents' (token grids)")
        if p.can("hidden", "heads") and self.hidden % self.heads:
            p.add(f"hidden {self.hidden} is not divisible by heads {self.heads}")


def mask_schedule(r: Tensor | float) -> Tensor:
    """Share of masked tokens: cos(pi r / 2) (the paper's cosine schedule)."""
    return torch.cos(torch.as_tensor(r, dtype=torch.float64) * math.pi / 2)


class MaskGIT(Family):
    name: ClassVar[str] = "maskgit"
    Config: ClassVar[type[FamilyConfig]] = MaskGITConfig
    samplers: ClassVar[tuple[str, ...]] = ("parallel",)
    default_sampler: ClassVar[str] = "parallel"
    default_steps: ClassVar[int] = 8

    cfg: MaskGITConfig

    def __init__(self, cfg: MaskGITConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        L = c.image_size * c.image_size
        self.mask_id = c.vocab_size
        self.tok = nn.Embedding(c.vocab_size + 1, c.hidden)
        self.pos = nn.Parameter(torch.randn(1, L + 1, c.hidden) * 0.02)
        if c.conditioning == "class":
            self.cond_embed: nn.Module = nn.Embedding(c.num_classes + 1, c.hidden)  # last = null class
        elif c.conditioning == "text":
            self.cond_embed = nn.Linear(self.text_dim, c.hidden)
        else:
            self.cond_embed = nn.Embedding(1, c.hidden)
        layer = nn.TransformerEncoderLayer(c.hidden, c.heads, 4 * c.hidden, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    def _cond_token(self, cond: dict[str, Tensor], n: int) -> Tensor:
        if self.cfg.conditioning == "class":
            return self.cond_embed(cond["class"])[:, None]
        if self.cfg.conditioning == "text":
            return self.cond_embed(cond["pooled"].to(self.pos.dtype))[:, None]
        return self.cond_embed(torch.zeros(n, dtype=torch.long, device=self.pos.device))[:, None]

    def logits(self, tokens: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """[B, L] ids (mask_id where masked) -> [B, L, vocab] logits."""
        h = torch.cat([self._cond_token(cond, tokens.shape[0]), self.tok(tokens)], 1) + self.pos
        return self.head(self.norm(self.blocks(h)))[:, 1:]

    def _tokens(self, batch: Mapping[str, Any]) -> Tensor:
        x = self.check_images(batch)
        t = x[:, 0].round().long().flatten(1)
        if int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size:
            raise ValueError(f"MaskGIT.loss: token ids must lie in [0, {self.cfg.vocab_size - 1}], got "
                             f"{int(t.min())}..{int(t.max())}; is this a token dataset of the same tokenizer?")
        return t

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        tokens = self._tokens(batch)
        cond = self.training_condition(batch, generator)
        B, L = tokens.shape
        dev = tokens.device
        ratio = mask_schedule(rand(B, generator, dev)).float().to(dev)
        n_mask = torch.clamp((ratio * L).ceil().long(), 1, L)
        g_dev = generator.device if generator is not None else dev
        noise = torch.rand(B, L, generator=generator, device=g_dev).to(dev)
        rank = noise.argsort(1).argsort(1)  # a random permutation rank per position
        mask = rank < n_mask[:, None]
        inp = torch.where(mask, torch.full_like(tokens, self.mask_id), tokens)
        logits = self.logits(inp, cond)
        loss = F.cross_entropy(logits[mask].float(), tokens[mask])
        with torch.no_grad():
            acc = float((logits[mask].argmax(-1) == tokens[mask]).float().mean())
        return LossOut({"model": loss}, {"masked_accuracy": acc, "mask_ratio": float(ratio.mean())})

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """Parallel iterative decoding in ``steps`` steps; returns decoded images when the
        tokenizer is known (``autoencoder``), else the token grid [n, 1, h, w] as floats."""
        sampler, steps = self._check_sampling(sampler, steps, guidance, conditioning, negative, options)
        c = self.cfg
        L = c.image_size * c.image_size
        where = "MaskGIT.sample"
        cond = self.null_condition(n) if conditioning is None else self.condition_from(conditioning, n, where)
        uncond = self.null_condition(n) if negative is None else self.condition_from(negative, n, where)
        if c.conditioning == "none":
            cond = uncond = {}
        dev = self.device
        g_dev = generator.device if generator is not None else dev
        tokens = torch.full((n, L), self.mask_id, dtype=torch.long, device=dev)
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                for t in range(steps):
                    logits = self.logits(tokens, cond).float()
                    if guidance != 1.0:
                        lu = self.logits(tokens, uncond).float()
                        logits = lu + guidance * (logits - lu)
                    probs = F.softmax(logits / c.temperature, -1)
                    sampled = torch.multinomial(probs.view(-1, c.vocab_size).to(g_dev), 1,
                                                generator=generator).view(n, L).to(dev)
                    masked = tokens == self.mask_id
                    sampled = torch.where(masked, sampled, tokens)
                    conf = probs.gather(-1, sampled[..., None])[..., 0].clamp_min(1e-12).log()
                    anneal = c.confidence_noise * (1 - (t + 1) / steps)
                    u = torch.rand(n, L, generator=generator, device=g_dev).to(dev).clamp(1e-12, 1 - 1e-12)
                    conf = conf + anneal * -torch.log(-torch.log(u))  # Gumbel noise on the confidences
                    conf = torch.where(masked, conf, torch.full_like(conf, math.inf))  # kept tokens stay
                    keep_masked = int(math.floor(float(mask_schedule((t + 1) / steps)) * L))
                    if keep_masked > 0:
                        low = conf.argsort(1)[:, :keep_masked]
                        sampled.scatter_(1, low, self.mask_id)
                    tokens = sampled
        finally:
            self.train(was)
        grid = tokens.view(n, 1, c.image_size, c.image_size).float()
        out = self.decode_latents(grid) if c.autoencoder else grid
        return SampleResult(out, steps)
