"""Exponential moving average of a module's weights, kept apart from the live weights.

The shadow is a dict of tensors, never a second module: the only way EMA weights reach a
module is :meth:`EMA.swap_in` (restores the live weights on exit, even on error) or
:meth:`EMA.copy_into` on a module the caller names explicitly (e.g. a ``copy.deepcopy``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * live`` for the trainable floating parameters, and
    only for them: buffers and frozen weights (a frozen base under an adapter, a consistency
    model's target network, LCM's target adapters) would be copies of the live tensors, so a
    checkpoint keeps them once, under ``model/``, and loaders take what ``ema/`` lacks from there
    (``models.checkpoint.load_family``).

    ``names``: shadow only these state_dict entries (a family's ``checkpoint_state()`` keys).

    ``warmup``: the decay at optimizer step n (0-based) is ``min(decay, (1 + n) / (10 + n))``, the
    usual warm-up (diffusers' ``EMAModel`` default form), so the shadow forgets its random
    initial weights within a few hundred steps: without it a fraction decay^n of the shadow is
    still the untrained init after n steps (0.99^200 = 13%, 0.998^800 = 20%), which is what a short
    run samples from."""

    def __init__(self, module: nn.Module, decay: float, names: Iterable[str] | None = None,
                 warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        # every state_dict name of a trainable tensor, tied aliases included (one name left out
        # would load the raw weights over the EMA ones)
        trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
        self.shadow: dict[str, Tensor] = {}
        state = module.state_dict()
        if names is not None:
            keep = set(names)
            unknown = sorted(keep - set(state))
            if unknown:
                raise ValueError(f"EMA: {type(module).__name__} has no state entries {unknown[:5]}")
            state = {k: v for k, v in state.items() if k in keep}
        for name, t in state.items():
            if t.is_floating_point() and name in trainable:
                self.shadow[name] = t.detach().clone()
        if not self.shadow:
            raise ValueError(f"EMA: {type(module).__name__} has no trainable floating-point parameters")

    def decay_at(self, step: int | None) -> float:
        """The decay used for the update after optimizer step ``step`` (0-based)."""
        if not self.warmup or step is None:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int | None = None) -> None:
        """Blend the live weights in; ``step`` (the optimizer step just taken, 0-based) sets the
        warm-up decay (ignored without ``warmup``)."""
        decay = self.decay_at(step)
        # live tensors by state_dict name, without building a state_dict (costly per step)
        live = dict(module.named_parameters(remove_duplicate=False))
        shadow, current = [], []
        for name, s in self.shadow.items():
            t = live[name].detach()
            if t.dtype != s.dtype or t.device != s.device:
                t = t.to(device=s.device, dtype=s.dtype)
            shadow.append(s)
            current.append(t)
        # s + (1-d)(live - s) = d*s + (1-d)*live, one fused kernel per tensor group
        torch._foreach_lerp_(shadow, current, 1.0 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"EMA state: missing keys {missing[:10]}, unexpected keys {extra[:10]}")
        for name, s in self.shadow.items():
            t = state[name]
            if tuple(t.shape) != tuple(s.shape):
                raise ValueError(f"EMA state: {name!r} has shape {tuple(t.shape)}, expected {tuple(s.shape)}")
            s.copy_(t)

    @torch.no_grad()
    def copy_into(self, module: nn.Module) -> None:
        """Load the EMA weights into ``module`` (meant for a copy, not the model being trained)."""
        module.load_state_dict(self.shadow, strict=False)

    @contextmanager
    def swap_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``module`` holds the EMA weights; the live ones come back on exit."""
        state = module.state_dict()
        saved = {name: state[name].detach().clone() for name in self.shadow}
        try:
            with torch.no_grad():
                for name, s in self.shadow.items():
                    state[name].copy_(s)
            yield module
        finally:
            with torch.no_grad():
                for name, t in saved.items():
                    state[name].copy_(t)
