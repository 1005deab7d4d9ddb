"""The multi-scale residual VQ tokenizer of VAR (Tian et al. 2024, "Visual Autoregressive
Modeling", Algorithm 1), on the VQ tokenizer of models/vq.py (same encoder/decoder, same EMA
codebook with dead-code restarts, shared by all scales).

The encoder's latent f [B, D, S, S] is quantised coarse to fine over ``scales`` s_1 < ... < s_K = S:

    r_1 = f;   z_k = Q(down(r_k, s_k));   r_{k+1} = r_k - up(z_k, S);   f_hat = sum_k up(z_k, S)

(down: area interpolation, up: bicubic, Q: nearest codebook entry; VAR's learned phi_k
convolutions on up(z_k) are left out: here the codebook follows EMA statistics and nothing
trains them).  The decoder sees f_hat with the straight-through gradient; the commitment loss
pulls f towards it.  A token "grid" is the K token maps packed into [K, S, S] (map k in the
top-left s_k x s_k corner of channel k, zeros elsewhere), so a tokenized dataset is an ordinary
latent dataset of K channels (imagegen/latents.py) that the VAR transformer (models/var.py)
trains on.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from imagegen.checks import Problems
from models.base import FamilyConfig
from models.vq import VQConfig, VQTokenizer


class MSVQConfig(VQConfig):
    quantizer: Literal["vq"] = Field("vq", description="Residual quantisation over one shared VQ codebook")
    scales: tuple[int, ...] = Field((1, 2, 3, 4), min_length=1, max_length=32,
                                    description="Token map sides s_1 < ... < s_K; s_K = image_size / 2^levels")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if not p.can("scales"):
            return
        s = self.scales
        if not s or any(b <= a for a, b in zip(s, s[1:])) or s[0] < 1:
            p.add(f"scales must be positive and strictly increasing, got {list(s)}")
        side = self.image_size // 2 ** self.levels
        if s and p.can("image_size", "levels") and s[-1] != side:
            p.add(f"the last scale must be the latent side image_size / 2^levels = {side}, got scales {list(s)}")


def down(x: Tensor, side: int) -> Tensor:
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="area")


def up(x: Tensor, side: int) -> Tensor:
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


class MultiScaleVQ(VQTokenizer):
    name: ClassVar[str] = "msvq"
    Config: ClassVar[type[FamilyConfig]] = MSVQConfig

    cfg: MSVQConfig

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.cfg.scales)

    @property
    def side(self) -> int:
        return self.cfg.scales[-1]

    @property
    def token_shape(self) -> tuple[int, ...]:
        return (len(self.scales), self.side, self.side)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return self.token_shape

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(f_hat [B, D, S, S], all scales' token ids concatenated [B, sum s_k^2])."""
        residual, f_hat, ids = z, torch.zeros_like(z), []
        for s in self.scales:
            q, idx = self._vq(down(residual, s))
            u = up(q, self.side)
            f_hat, residual = f_hat + u, residual - u
            ids.append(idx.flatten(1))
        return f_hat, torch.cat(ids, 1)

    # ------------------------------------------------------------------ token maps

    def split(self, flat: Tensor) -> list[Tensor]:
        """[B, sum s_k^2] -> the K maps [B, s_k, s_k]."""
        out, start = [], 0
        for s in self.scales:
            out.append(flat[:, start:start + s * s].reshape(-1, s, s))
            start += s * s
        return out

    def pack(self, maps: list[Tensor]) -> Tensor:
        """K maps [B, s_k, s_k] -> [B, K, S, S] (zeros outside each map's corner)."""
        B = maps[0].shape[0]
        out = torch.zeros(B, len(maps), self.side, self.side, dtype=torch.long, device=maps[0].device)
        for k, m in enumerate(maps):
            out[:, k, :m.shape[1], :m.shape[2]] = m
        return out

    def unpack(self, tokens: Tensor) -> list[Tensor]:
        """[B, K, S, S] packed ids -> the K maps [B, s_k, s_k]."""
        K = len(self.scales)
        if tokens.ndim != 4 or tuple(tokens.shape[1:]) != self.token_shape:
            raise ValueError(f"MultiScaleVQ: packed tokens must have shape [B, {K}, {self.side}, {self.side}], got "
                             f"{tuple(tokens.shape)}")
        return [tokens[:, k, :s, :s].long() for k, s in enumerate(self.scales)]

    def scale_latents(self, maps: list[Tensor]) -> list[Tensor]:
        """Each map's contribution up(codebook[z_k], S) to f_hat; their sum is f_hat."""
        return [up(self.codebook[m].permute(0, 3, 1, 2), self.side) for m in maps]

    def next_scale_inputs(self, maps: list[Tensor]) -> list[Tensor]:
        """VAR's teacher-forcing inputs: f_hat after scales 1..k, area-downsampled to s_{k+1}, for
        k = 1..K-1 (each [B, D, s_{k+1}, s_{k+1}])."""
        acc, out = None, []
        for k, u in enumerate(self.scale_latents(maps[:-1])):
            acc = u if acc is None else acc + u
            out.append(down(acc, self.scales[k + 1]))
        return out

    # ------------------------------------------------------------------ API

    def encode_tokens(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.pack(self.split(self.quantize(self.encode_latent(x))[1]))

    def codes_to_latent(self, tokens: Tensor) -> Tensor:
        return torch.stack(self.scale_latents(self.unpack(tokens))).sum(0)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """[B, K, S, S] packed token maps -> images."""
        return self.decoder(self.codes_to_latent(tokens))
