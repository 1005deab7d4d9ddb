"""Reflow (Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow"): retrain a flow on (noise, teacher sample) couplings so its paths straighten.

The couplings come from a dataset built by imagegen.distill.reflow_pairs: each sample is a
teacher ODE sample stored as a lossless PNG, with the seed of the Gaussian noise it started from
in its .json (``noise_seed``); the noise is regenerated here, bit for bit, from that seed
(``pair_noise``).  The loss is the flow-matching loss of models/flow.py with the independent
noise replaced by the paired one:

    x_t = (1 - t) x1 + t z,   target z - x1,   t ~ U(0, 1)

The student starts from the teacher's weights and keeps its network and sampler (Euler/Heun);
one round of reflow makes few-step (even one-step) Euler sampling close to the teacher's
many-step samples.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field
from torch import Tensor

from models.base import FamilyConfig, LossOut
from models.flow import FlowConfig, FlowMatching
from models.teacher import TeacherError, TeacherMixin, same_fields

_SAME = ("net", "net_size", "net_overrides", "image_size", "channels", "data", "conditioning", "num_classes",
         "text_encoder", "text_tokens")
NOISE_KEY = "noise_seed"


def pair_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The unit Gaussian x_T of each pair: one CPU generator per sample seed (independent of
    batch composition, so the dataset's pairs can be read in any order)."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
    return out.to(device=device, dtype=dtype)


class ReflowConfig(FlowConfig):
    teacher: str = Field("", description="Teacher checkpoint folder (a flow run, or a previous reflow)")
    t_sampling: Literal["uniform", "logit_normal"] = Field("uniform", description="Training time distribution")
    default_steps: int = Field(1, ge=1, le=1000, description="Sampling steps of the straightened student")


class Reflow(TeacherMixin, FlowMatching):
    name: ClassVar[str] = "reflow"
    Config: ClassVar[type[FamilyConfig]] = ReflowConfig
    needs_meta: ClassVar[bool] = True

    cfg: ReflowConfig

    def __init__(self, cfg: ReflowConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.default_steps = self.cfg.default_steps
        self.init_teacher(None, lambda t: same_fields(self.cfg, t.cfg, _SAME, "reflow"))

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x1 = self.check_images(batch)
        z = batch_pair_noise(batch, x1, "reflow")
        return self.velocity_loss(x1, self.training_condition(batch, generator), generator, eps=z)


def batch_pair_noise(batch: Mapping[str, Any], x1: Tensor, where: str) -> Tensor:
    """The paired noise of a batch of a reflow pairs dataset (seeds from the samples' .json)."""
    metas = batch.get("meta")
    if not isinstance(metas, list) or len(metas) != x1.shape[0]:
        raise TeacherError(f"{where}: batches need the samples' .json (batch['meta']) with their noise seeds; "
                           "train on a reflow pairs dataset (imagegen distill --method reflow builds it)")
    try:
        seeds = [int(m[NOISE_KEY]) for m in metas]
    except (KeyError, TypeError, ValueError):
        keys = batch.get("key", [])[:3]
        raise TeacherError(f"{where}: samples {keys} have no integer {NOISE_KEY!r} in their .json; this is not a "
                           "reflow pairs dataset") from None
    return pair_noise(seeds, tuple(x1.shape[1:]), x1.device, x1.dtype)


def straightness(trajectory: list[Tensor], ts: Tensor) -> float:
    """Liu et al. 2023's S = int E |(x_end - x_start) - dx/dt|^2 dt, estimated on an ODE
    trajectory (the states at times ``ts``), per dimension; 0 for perfectly straight paths."""
    t = [float(v) for v in ts]
    if len(trajectory) != len(t) or len(t) < 2:
        raise ValueError(f"straightness: need one state per time, got {len(trajectory)} states, {len(t)} times")
    chord = (trajectory[-1] - trajectory[0]) / (t[-1] - t[0])
    total = 0.0
    for i in range(len(t) - 1):
        dt = t[i + 1] - t[i]
        vel = (trajectory[i + 1] - trajectory[i]) / dt
        total += abs(dt) * float(((vel - chord) ** 2).mean())
    return total / abs(t[-1] - t[0])
