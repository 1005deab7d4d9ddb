"""Frozen open_clip text tower as a conditioning encoder: captions -> (tokens, mask, pooled).

Loaded through ``imagegen.clip.load_clip`` (the one path every CLIP in the project takes), so a
family conditioned on "ViT-B-32:laion2b_s34b_b79k", "hf-hub:..." or a project-built
"local-dir:..." CLIP uses the same code the tests use.  The encoder is shared per (spec, device)
and is *not* a submodule of any family: its weights stay out of the family's parameters,
optimizers, state_dict and EMA copies.

Token features are the final-layer hidden states after ``ln_final`` and the text projection, so
tokens and pooled share one width D (= the CLIP's embed_dim) as the networks' ``text_dim``
expects; pooled is exactly ``model.encode_text`` (unnormalised), since projecting then pooling
equals pooling then projecting.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from imagegen.clip import ClipModel, load_clip


class TextEmbeddings(NamedTuple):
    """tokens [B, L, D] (float32), mask [B, L] (bool, True = real token), pooled [B, D]."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


class TextEncoder:
    """A frozen open_clip text tower; call it on a list of captions."""

    def __init__(self, clip: ClipModel) -> None:
        model = clip.model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
        missing = [a for a in needed if not hasattr(model, a)]
        if missing:
            raise ValueError(
                f"TextEncoder: CLIP {str(clip.spec)!r} ({type(model).__name__}) has no built-in text "
                f"transformer (missing {missing}); only open_clip CLIP models with the standard text "
                f"tower are supported (not HF-text or SigLIP-style CustomTextCLIP towers)"
            )
        self.clip = clip
        self.spec = str(clip.spec)
        self.device = clip.device
        self.dim = int(clip.embed_dim)
        self.context_length = int(model.positional_embedding.shape[0])

    def __call__(self, texts: Sequence[str]) -> TextEmbeddings:
        if isinstance(texts, str):
            raise TypeError("TextEncoder takes a list of captions, not a single string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"TextEncoder: caption {i} is {type(t).__name__}, not str")
        m = self.clip.model
        ids = self.clip.tokenizer(texts).to(self.device)
        with torch.inference_mode():
            cast = m.transformer.get_cast_dtype()
            x = m.token_embedding(ids).to(cast) + m.positional_embedding.to(cast)
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
            proj = m.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
            rows = torch.arange(ids.shape[0], device=ids.device)
            pool = getattr(m, "text_pool_type", "argmax")
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
            if pool == "argmax":  # end token has the highest id (open_clip's SimpleTokenizer)
                end = ids.argmax(dim=-1)
            elif pool == "eos":
                end = (ids == m.text_eos_id).int().argmax(dim=-1)
            elif pool in ("first", "last"):
                end = torch.full_like(ids[:, 0], 0 if pool == "first" else ids.shape[1] - 1)
            else:
                raise ValueError(f"TextEncoder: unsupported text_pool_type {pool!r} in {self.spec!r}")
            pooled = x[rows, end]
            # Causal tower: every position up to the pooled one carries the caption; later
            # positions are padding and are masked out of cross-attention.
            mask = pos <= end[:, None] if pool != "first" else torch.ones_like(ids, dtype=torch.bool)
        return TextEmbeddings(x.float().clone(), mask.clone(), pooled.float().clone())


@functools.lru_cache(maxsize=8)
def _cached(spec: str, device: str) -> TextEncoder:
    return TextEncoder(load_clip(spec, device))


def get_text_encoder(spec: str, device: str | torch.device = "cpu") -> TextEncoder:
    """The shared encoder for ``spec`` on ``device`` (loaded once per process)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"get_text_encoder: spec must be a non-empty open_clip spec string, got {spec!r}")
    return _cached(spec.strip(), str(torch.device(device)))


def clear_text_encoder_cache() -> None:
    _cached.cache_clear()
