"""Discrete tokenizers on the family contract: VQ-VAE (van den Oord et al. 2017), FSQ (Mentzer
et al. 2024) and LFQ (Yu et al. 2024, MAGVIT-v2), sharing one convolutional encoder/decoder
(models/vae.py).

* VQ: nearest-codebook quantisation with the straight-through estimator; commitment loss
  beta |z_e - sg(q)|^2; the codebook follows the encoder outputs by exponential moving averages
  of cluster sizes and sums (paper Appendix A.1, Laplace-smoothed) instead of a codebook loss;
  codes whose average usage falls below ``dead_threshold`` are restarted on random encoder
  outputs of the step (Dhariwal et al. 2020, "Jukebox").  The EMA statistics are accumulated
  over the step's micro-batches, all-reduced across processes and applied in ``after_step``, so
  every rank keeps the same codebook.
* FSQ: each of ``len(fsq_levels)`` channels is bounded (tanh) and rounded to L_i levels with a
  straight-through gradient; the implicit codebook has prod(L_i) codes, nothing to learn,
  nothing to collapse.
* LFQ (lookup-free quantisation): each of ``lfq_bits`` channels is quantised to its sign, so the
  implicit codebook is {-1, 1}^bits (2^bits codes, the token id the bits read as a binary
  number), straight-through gradient, commitment beta |z - sg(q)|^2 and MAGVIT-v2's entropy
  penalty  E[H(p(c|z))] - diversity * H(E[p(c|z)]),  p(c|z) = softmax_c(2 z.c / tau) over all
  codes: confident assignments per position, uniform use of the codebook over the batch.

Logged: reconstruction MSE, codebook usage (share of codes used in the batch) and perplexity
exp(H) of the code distribution.  ``encode_tokens``/``decode_tokens`` map images to token grids
and back (for a token model such as MaskGIT); ``sample`` decodes uniformly random tokens.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems
from models.base import Family, FamilyConfig, LossOut
from models.samplers import SampleResult
from models.vae import Decoder, Encoder


class VQConfig(FamilyConfig):
    builds_denoiser: ClassVar[bool] = False

    quantizer: Literal["vq", "fsq", "lfq"] = Field("vq", description="VQ codebook, finite scalar or lookup-free "
                                                  "quantisation")
    codebook_size: int = Field(256, ge=2, le=65536, description="VQ: number of codes K")
    code_dim: int = Field(8, ge=1, le=1024, description="VQ: code (latent channel) dimension")
    commitment: float = Field(0.25, ge=0.0, le=10.0, description="VQ: commitment weight beta")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="VQ: codebook EMA decay")
    dead_threshold: float = Field(1.0, ge=0.0, description="VQ: restart codes whose EMA usage (expected count per "
                                  "step) falls below this; 0 = never")
    fsq_levels: tuple[int, ...] = Field((8, 5, 5, 5), min_length=1, max_length=16,
                                        description="FSQ: levels per channel (codebook = their product)")
    lfq_bits: int = Field(10, ge=1, le=16, description="LFQ: bits per token (codebook = 2^bits)")
    entropy_weight: float = Field(0.1, ge=0.0, le=10.0, description="LFQ: weight of the entropy penalty")
    diversity: float = Field(1.0, ge=0.0, le=10.0, description="LFQ: weight of the codebook entropy inside it")
    lfq_temperature: float = Field(0.01, gt=0.0, le=10.0, description="LFQ: temperature tau of p(c|z)")
    levels: int = Field(2, ge=0, le=6, description="Downsampling levels (factor 2 each)")
    width: int = Field(32, ge=4, le=1024, description="Channels of the first level")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("image_size", "levels") and self.image_size % (2 ** self.levels):
            p.add(f"image_size {self.image_size} is not divisible by 2^levels = {2 ** self.levels}")
        if p.can("conditioning") and self.conditioning != "none":
            p.add("a tokenizer is unconditional (conditioning='none')")
        if p.can("fsq_levels") and any(lv < 2 for lv in self.fsq_levels):
            p.add(f"every FSQ level count must be >= 2, got {self.fsq_levels}")

    @property
    def latent_channels(self) -> int:  # what the shared Encoder/Decoder read
        return {"vq": self.code_dim, "fsq": len(self.fsq_levels), "lfq": self.lfq_bits}[self.quantizer]


class _CoderConfig:
    """The fields the VAE encoder/decoder read, from a VQConfig."""

    def __init__(self, c: VQConfig) -> None:
        self.channels, self.width, self.levels = c.channels, c.width, c.levels
        self.latent_channels = c.latent_channels


class VQTokenizer(Family):
    name: ClassVar[str] = "vq"
    Config: ClassVar[type[FamilyConfig]] = VQConfig
    samplers: ClassVar[tuple[str, ...]] = ("decode",)
    default_sampler: ClassVar[str] = "decode"
    default_steps: ClassVar[int] = 1
    conditioning: ClassVar[frozenset[str]] = frozenset({"none"})

    cfg: VQConfig

    def __init__(self, cfg: VQConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        self.encoder = Encoder(_CoderConfig(c))  # type: ignore[arg-type]
        d = c.latent_channels
        # the shared encoder ends in 2*d channels (mean, log-variance for the VAE): project to d
        self.pre = nn.Conv2d(2 * d, d, 1)
        self.decoder = Decoder(_CoderConfig(c))  # type: ignore[arg-type]
        if c.quantizer == "vq":
            g = torch.Generator().manual_seed(0)
            self.register_buffer("codebook", torch.randn(c.codebook_size, d, generator=g) * 0.1)
            self.register_buffer("ema_count", torch.ones(c.codebook_size))
            self.register_buffer("ema_sum", self.codebook.clone())
            self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
            self._acc: list[Tensor] = []  # this step's (counts, sums, sample of z_e), per micro-batch
        elif c.quantizer == "fsq":
            self.register_buffer("fsq_levels_t", torch.tensor(c.fsq_levels, dtype=torch.float32))

    @property
    def vocab_size(self) -> int:
        c = self.cfg
        return {"vq": c.codebook_size, "fsq": math.prod(c.fsq_levels), "lfq": 2 ** c.lfq_bits}[c.quantizer]

    @property
    def token_shape(self) -> tuple[int, int]:
        s = self.cfg.image_size // 2 ** self.cfg.levels
        return (s, s)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (1, *self.token_shape)

    # ------------------------------------------------------------------ quantisers

    def _fsq(self, z: Tensor) -> tuple[Tensor, Tensor]:
        L = self.fsq_levels_t.view(1, -1, 1, 1).to(z)
        u = (torch.tanh(z) + 1) / 2 * (L - 1)  # each channel bounded to (0, L_i - 1)
        idx = u.round()
        q = u + (idx - u).detach()  # straight-through rounding
        levels = self.fsq_levels_t.to(z.device)
        radix = torch.cumprod(torch.cat([torch.ones(1, device=z.device), levels[:-1]]), 0).long()
        index = (idx.long() * radix.view(1, -1, 1, 1)).sum(1)  # mixed-radix code id
        return q / (L - 1) * 2 - 1, index  # channels back in [-1, 1]

    def _vq(self, z: Tensor) -> tuple[Tensor, Tensor]:
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        dist_ = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                 + self.codebook.pow(2).sum(1)[None])
        index = dist_.argmin(1)
        q = self.codebook[index].view(B, h, w, D).permute(0, 3, 1, 2)
        if self.training:
            onehot = F.one_hot(index, self.cfg.codebook_size).to(flat.dtype)
            pick = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(int(self.steps_done)))
            self._acc.append(torch.cat([onehot.sum(0)[:, None], onehot.t() @ flat.detach()], 1))
            self._sample = flat.detach()[pick.to(flat.device)]
        return q, index.view(B, h, w)

    def _bit_weights(self, device: torch.device) -> Tensor:
        return 2 ** torch.arange(self.cfg.lfq_bits, device=device).view(1, -1, 1, 1)

    def _lfq(self, z: Tensor) -> tuple[Tensor, Tensor]:
        bits = z > 0
        q = torch.where(bits, 1.0, -1.0).to(z.dtype)
        return q, (bits.long() * self._bit_weights(z.device)).sum(1)

    def lfq_entropy(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-position entropy of p(c|z), entropy of the batch-average p) over all 2^bits codes."""
        codes = self.codes_to_latent(torch.arange(self.vocab_size, device=z.device).view(1, 1, -1))[0, :, 0]
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        logp = (2 * flat @ codes / self.cfg.lfq_temperature).log_softmax(-1)
        p = logp.exp()
        per_sample = -(p * logp).sum(-1).mean()
        avg = p.mean(0)
        codebook = -(avg * avg.clamp_min(1e-12).log()).sum()
        return per_sample, codebook

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return {"vq": self._vq, "fsq": self._fsq, "lfq": self._lfq}[self.cfg.quantizer](z)

    # ------------------------------------------------------------------ API

    def encode_latent(self, x: Tensor) -> Tensor:
        return self.pre(self.encoder.out(self.encoder.body(x)))

    def encode_tokens(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.quantize(self.encode_latent(x))[1]

    def codes_to_latent(self, tokens: Tensor) -> Tensor:
        tokens = tokens.long()
        if self.cfg.quantizer == "vq":
            return self.codebook[tokens].permute(0, 3, 1, 2)
        if self.cfg.quantizer == "lfq":
            bits = (tokens[:, None] // self._bit_weights(tokens.device)) % 2
            return bits.float() * 2 - 1
        L = self.fsq_levels_t.to(tokens.device)
        digits, rest = [], tokens
        for lv in L.long().tolist():
            digits.append(rest % lv)
            rest = rest // lv
        idx = torch.stack(digits, 1).float()
        return idx / (L.view(1, -1, 1, 1) - 1) * 2 - 1

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """[B, h, w] (or [B, 1, h, w]) token ids -> images."""
        if tokens.ndim == 4:
            tokens = tokens[:, 0]
        return self.decoder(self.codes_to_latent(tokens))

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """(x_hat, reconstruction MSE, the quantiser's own loss terms, logs) of a training forward."""
        z = self.encode_latent(x)
        q, index = self.quantize(z)
        c = self.cfg
        logs: dict[str, float] = {}
        if c.quantizer in ("vq", "lfq"):
            commit = F.mse_loss(z.float(), q.detach().float())
            zq = z + (q - z).detach()  # straight-through
        else:
            commit = torch.zeros((), device=x.device)
            zq = q
        extra = c.commitment * commit
        if c.quantizer == "lfq" and c.entropy_weight > 0:
            per_sample, codebook = self.lfq_entropy(z)
            extra = extra + c.entropy_weight * (per_sample - c.diversity * codebook)
            logs.update(sample_entropy=float(per_sample.detach()), codebook_entropy=float(codebook.detach()))
        x_hat = self.decoder(zq)
        recon = F.mse_loss(x_hat.float(), x.float())
        counts = torch.bincount(index.flatten(), minlength=self.vocab_size).float()
        p = counts / counts.sum()
        perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        logs.update(mse=float(recon.detach()), commitment=float(commit.detach()),
                    usage=float((counts > 0).float().mean()), perplexity=perplexity)
        return x_hat, recon, extra, logs

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        _, recon, extra, logs = self.reconstruct(self.check_images(batch))
        return LossOut({"model": recon + extra}, logs)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.quantizer != "vq" or not self._acc:
            return
        stats = torch.stack(self._acc).sum(0)
        self._acc = []
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        n, s = stats[:, 0], stats[:, 1:]
        g = self.cfg.ema_decay
        self.ema_count.mul_(g).add_(n, alpha=1 - g)
        self.ema_sum.mul_(g).add_(s, alpha=1 - g)
        total = self.ema_count.sum()
        k = self.cfg.codebook_size
        smoothed = (self.ema_count + 1e-5) / (total + k * 1e-5) * total  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        if self.cfg.dead_threshold > 0:
            dead = (self.ema_count < self.cfg.dead_threshold).nonzero().flatten()
            sample = self._sample
            if dead.numel() and sample.shape[0]:
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(sample, 0)  # every rank restarts on rank 0's encoder outputs
                take = sample[torch.arange(dead.numel(), device=sample.device) % sample.shape[0]]
                self.codebook[dead] = take
                self.ema_sum[dead] = take
                self.ema_count[dead] = 1.0
        self.steps_done += 1

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """Decodes uniformly random tokens (a tokenizer has no prior: train a token model for that)."""
        self._check_sampling(sampler, steps, guidance, conditioning, negative, options)
        tokens = torch.randint(0, self.vocab_size, (n, *self.token_shape), generator=generator).to(self.device)
        with torch.no_grad():
            return SampleResult(self.decode_tokens(tokens).clamp(-1, 1), 1)
