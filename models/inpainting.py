"""A trained inpainting model (as SD-inpainting, Rombach et al. 2022): the denoiser takes the mask
and the masked image as extra input channels, [x_t, mask, image * (1 - mask)] (2C + 1 channels),
and is trained with random masks by the ordinary loss of an inner DDPM / EDM / flow family.

The inner family (``inner``, with its own fields in ``inner_options``) supplies loss, schedule
and samplers; its network is rebuilt with the extra input channels.  ``base`` (a checkpoint or
'run:<id>') starts from a trained run of that family: every weight is copied and the new input
channels of the first layer start at zero, so at step 0 the model is the base for any mask.
Masks during training are one random box per sample (a side of ``mask_min``..``mask_max`` of the
image), the whole image with probability ``p_full`` (plain generation) or an outpainting margin
with probability ``p_outpaint``, drawn from the loss generator.  Mask 1 = generate.

Sampling: ``sample(n, cond, image=..., mask=...)``; the known pixels are pasted back after
sampling unless ``paste=False`` (the network alone does not keep them exactly).  Latent families
mask the latents directly (the latent dataset holds no pixels).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.base import Family, FamilyConfig, LossOut, rand
from models import ddpm, edm, flow  # noqa: F401  (their loss/samplers run here: in the run id's code closure)
from models.nets import build_net
from models.samplers import SampleResult
from models.checkpoint import load_family
from models.teacher import TeacherError


class InpaintingConfig(FamilyConfig):
    inner: Literal["ddpm", "edm", "flow"] = Field("flow", description="The family whose loss and samplers are used")
    inner_options: dict[str, Any] = Field(default_factory=dict, description="That family's own fields "
                                          "(prediction, schedule, shift, ...)")
    base: str | None = Field(None, description="Start from this run of the inner family (checkpoint or 'run:<id>')")
    mask_min: float = Field(0.25, gt=0.0, le=1.0, description="Smallest side of a random mask box / image side")
    mask_max: float = Field(0.75, gt=0.0, le=1.0, description="Largest side of a random mask box / image side")
    p_full: float = Field(0.1, ge=0.0, le=1.0, description="Probability of an all-ones mask (plain generation)")
    p_outpaint: float = Field(0.2, ge=0.0, le=1.0, description="Probability of an outpainting margin mask")


class ConcatNet(nn.Module):
    """net(cat([x, extra]), t, cond) with ``extra`` (mask, masked image) set by the family."""

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__()
        self.net, self.channels = net, channels
        self.extra: Tensor | None = None

    @property
    def cfg(self) -> Any:
        return self.net.cfg

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor | None] | None = None) -> Tensor:
        extra = self.extra
        if extra is None:  # no image given: everything is generated
            extra = torch.cat([torch.ones_like(x[:, :1]), torch.zeros_like(x)], dim=1)
        if extra.shape[0] != x.shape[0]:  # the doubled batch of CFG
            extra = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)
        return self.net(torch.cat([x, extra.to(x)], dim=1), t, cond)


def random_masks(n: int, side: int, cfg: InpaintingConfig, generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
    """[n, 1, side, side] masks (1 = generate) drawn from the generator: box, full or margin."""
    u = rand(6 * n, generator, "cpu").reshape(n, 6)
    m = torch.zeros((n, 1, side, side))
    lo, hi = cfg.mask_min, max(cfg.mask_max, cfg.mask_min)
    for i in range(n):
        kind, a, b, c, d, e = u[i].tolist()
        if kind < cfg.p_full:
            m[i] = 1
        elif kind < cfg.p_full + cfg.p_outpaint:
            k = max(1, int(side * (lo + (hi - lo) * a) / 2))
            which = int(b * 4)
            if which == 0:
                m[i, :, :, :k] = 1
            elif which == 1:
                m[i, :, :, side - k:] = 1
            elif which == 2:
                m[i, :, :k, :] = 1
            else:
                m[i, :, side - k:, :] = 1
        else:
            h = max(1, round(side * (lo + (hi - lo) * a)))
            w = max(1, round(side * (lo + (hi - lo) * b)))
            y0, x0 = int(c * (side - h + 1)), int(d * (side - w + 1))
            m[i, :, y0:y0 + h, x0:x0 + w] = 1
    return m.to(device)


class Inpainting(Family):
    name: ClassVar[str] = "inpainting"
    Config: ClassVar[type[FamilyConfig]] = InpaintingConfig
    samplers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm", "heun", "euler", "dpmpp_2m")
    default_sampler: ClassVar[str] = "ddim"

    cfg: InpaintingConfig

    def __init__(self, cfg: InpaintingConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        from models.registry import build_family

        c = self.cfg
        own = c.model_dump(include=set(FamilyConfig.model_fields))
        inner = build_family(c.inner, {**own, **c.inner_options})
        C = c.channels
        net_cfg = inner.net.cfg.model_copy(update={"in_channels": 2 * C + 1})
        inner.net = ConcatNet(build_net(c.net, net_cfg), C)
        self.inner = inner
        if c.base:
            self._init_from(c.base)
        self.samplers, self.default_sampler, self.default_steps = inner.samplers, inner.default_sampler, inner.default_steps
        self.sampler_options = {k: (*inner.sampler_options.get(k, ()), "image", "mask", "paste") for k in inner.samplers}

    def _init_from(self, ref: str) -> None:
        base = load_family(ref)
        if base.name != self.cfg.inner:
            raise TeacherError(f"inpainting: base {ref} is a {base.name!r} run; inner is {self.cfg.inner!r}")
        theirs, own = base.net.state_dict(), self.inner.net.net.state_dict()
        if set(theirs) != set(own):
            raise TeacherError(f"inpainting: the base's network does not match ({len(set(theirs) ^ set(own))} "
                               "tensors differ by name); use the base's net config")
        C = self.cfg.channels
        new = {}
        for k, v in own.items():
            t = theirs[k]
            if t.shape == v.shape:
                new[k] = t
            elif t.ndim == v.ndim and t.shape[0] == v.shape[0] and t.shape[2:] == v.shape[2:] and t.shape[1] == C:
                w = torch.zeros_like(v)
                w[:, :C] = t  # the first layer: the new mask / image channels start at zero
                new[k] = w
            else:
                raise TeacherError(f"inpainting: base tensor {k} has shape {tuple(t.shape)}, expected {tuple(v.shape)}")
        self.inner.net.net.load_state_dict(new)

    @property
    def net(self) -> nn.Module:  # type: ignore[override]
        return self.inner.net

    def _extra(self, x0: Tensor, mask: Tensor) -> Tensor:
        return torch.cat([mask, x0 * (1 - mask)], dim=1)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x0 = self.check_images(batch)
        m = random_masks(x0.shape[0], x0.shape[-1], self.cfg, generator, x0.device).to(x0.dtype)
        self.inner.net.extra = self._extra(x0, m)
        try:
            return self.inner.loss(batch, generator)
        finally:
            self.inner.net.extra = None

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """``image`` [1|n, C, S, S] and ``mask`` ([S, S] .. [1|n, 1, S, S], 1 = generate) give the
        known region; without them everything is generated."""
        from models.editing import check_mask

        image, mask, paste = options.pop("image", None), options.pop("mask", None), options.pop("paste", True)
        where = "Inpainting.sample"
        if (image is None) != (mask is None):
            raise ValueError(f"{where}: give both image and mask, or neither")
        extra = known = None
        if image is not None:
            c, s = self.cfg.channels, self.cfg.image_size
            if not isinstance(image, Tensor) or image.ndim != 4 or tuple(image.shape[1:]) != (c, s, s):
                got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"{where}: the image is {got}, the model takes [1|{n}, {c}, {s}, {s}]")
            image = image.to(self.device).expand(n, -1, -1, -1)
            m = check_mask(mask, image, where)
            m = torch.zeros_like(image[:, :1]) if m is None else m
            extra, known = self._extra(image, m), (image, m)
        self.inner.net.extra = extra
        try:
            res = self.inner.sample_result(n, conditioning, sampler, steps, guidance, negative, generator, x_T, **options)
        finally:
            self.inner.net.extra = None
        if known is not None and paste and self.cfg.data == "pixels":
            res.sample = torch.where(known[1] == 0, known[0].clamp(-1, 1), res.sample)
        return res

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        return self.inner.run_sampler(net_fn, x_T, sampler, steps, generator, options)


def masked_region_error(samples: Tensor, images: Tensor, mask: Tensor) -> float:
    """Mean squared error inside the mask (how close an inpainting is to the held-out truth)."""
    m = mask.expand_as(samples[:, :1]).bool().expand_as(samples)
    return float(F.mse_loss(samples[m], images.expand_as(samples)[m]))
