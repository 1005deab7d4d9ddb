"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models")
for the U-Net and the DiT, as a family trained by the generic trainer on top of a frozen base run.

* **U-Net**: a trainable copy of the base's input conv, condition embedding, down stages and
  middle block; the control map enters through a small conv encoder whose last conv is zero, and
  every skip and the middle output of the copy reach the frozen base through zero-initialised
  1x1 convs (added to the base's skips / middle output, times ``control_scale``).
* **DiT** (the ControlNet-Transformer of PixArt-delta, Chen et al. 2024): trainable copies of the
  first ``dit_blocks`` blocks; their input is the base's patch tokens plus the zero-initialised
  patch embedding of the control map, and block i's output reaches the base after its block i
  through a zero-initialised linear.

So at step 0 the controlled network is the base exactly.  The base is held outside the module
tree (no optimizer, EMA or checkpoint sees it; like a distillation teacher, models/teacher.py)
and is needed at sampling too: a ControlNet checkpoint holds only the control branch and a
fingerprint of its base's weights, and refuses to load over another base.  Training and sampling
run the base family's own ``loss`` / ``sample_result`` with its ``net`` swapped for the
controlled one for the duration of the call, so every base family (DDPM, EDM, flow and their
students) gets control with its own schedule, loss and samplers.

Control signals come from the image itself, deterministically (computed per batch in ``loss``):
``canny`` (OpenCV Canny edges, 1 channel) or ``boxes`` / ``segmentation`` (the world's pixel
detector, imagegen/world/detector.py: one channel per world shape, filled boxes or object masks).
Maps are in [-1, 1] at the image's pixel size; ``control_map(images)`` computes one for sampling.
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.base import Family, FamilyConfig, LossOut
from models import ddpm, edm, flow  # noqa: F401  (their loss/samplers run here: in the run id's code closure)
from models.samplers import SampleResult
from models.checkpoint import load_family
from models.teacher import TeacherError, same_fields

_SAME = ("net", "net_size", "net_overrides", "image_size", "channels", "data", "conditioning", "num_classes",
         "text_encoder", "text_tokens")
Signal = Literal["canny", "boxes", "segmentation"]


class ControlNetConfig(FamilyConfig):
    base: str = Field("", description="Checkpoint folder of the frozen base run (or 'run:<id>' via the run layer)")
    signal: Signal = Field("canny", description="Control map computed from each image: canny edges, or the world "
                           "detector's boxes / segmentation masks (one channel per shape)")
    canny_low: int = Field(100, ge=0, le=1000, description="Canny lower hysteresis threshold (8-bit gray)")
    canny_high: int = Field(200, ge=1, le=1000, description="Canny upper hysteresis threshold")
    dit_blocks: int = Field(0, ge=0, le=128, description="DiT: blocks copied into the control branch (0 = half)")
    control_scale: float = Field(1.0, ge=0.0, le=10.0, description="Default weight of the control residuals")


# ----------------------------------------------------------------------------- control maps


def _uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (round to nearest, as the loader's inverse)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def signal_channels(signal: str) -> int:
    from imagegen.world.scene import SHAPES

    return 1 if signal == "canny" else len(SHAPES)


def control_map(images: Tensor, signal: str = "canny", canny_low: int = 100, canny_high: int = 200) -> Tensor:
    """The control map of ``images`` ([B, 3, H, W] in [-1, 1]): [B, C, H, W] in {-1, 1}."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"control_map: images must be [B, 3, H, W] in [-1, 1], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    arr = _uint8(images)
    B, H, W, _ = arr.shape
    if signal == "canny":
        import cv2

        out = np.stack([cv2.Canny(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), canny_low, canny_high) for a in arr])
        maps = torch.from_numpy(out.astype(np.float32) / 255.0)[:, None]
    elif signal in ("boxes", "segmentation"):
        from imagegen.world.detector import detect
        from imagegen.world.scene import SHAPES

        maps = torch.zeros((B, len(SHAPES), H, W))
        for b, a in enumerate(arr):
            for d in detect(a, with_masks=signal == "segmentation"):
                if d.class_name not in SHAPES:
                    continue
                k = SHAPES.index(d.class_name)
                if signal == "boxes":
                    x0, y0, x1, y1 = d.box
                    maps[b, k, y0:y1, x0:x1] = 1.0
                else:
                    maps[b, k][torch.from_numpy(np.asarray(d.mask, dtype=bool))] = 1.0
    else:
        raise ValueError(f"control_map: unknown signal {signal!r}; choose canny, boxes or segmentation")
    return (maps * 2 - 1).to(images.device)


# ----------------------------------------------------------------------------- control branches


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class UNetControl(nn.Module):
    """Trainable copy of a U-Net's encoder + zero convs; ``forward`` runs base and branch together."""

    def __init__(self, base: nn.Module, hint_channels: int) -> None:
        super().__init__()
        mc = base.cfg.model_channels
        self.cond_embed = copy.deepcopy(base.cond_embed)
        self.conv_in = copy.deepcopy(base.conv_in)
        self.hint = nn.Sequential(nn.Conv2d(hint_channels, 16, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), _zero(nn.Conv2d(32, mc, 3, padding=1)))
        self.down = copy.deepcopy(base.down)
        self.mid = copy.deepcopy(base.mid)
        chs = [mc] + [self._out_channels(stage) for stage in base.down]
        self.zero_skips = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in chs)
        mid_ch = base.mid[-1].cout
        self.zero_mid = _zero(nn.Conv2d(mid_ch, mid_ch, 1))

    @staticmethod
    def _out_channels(stage: nn.ModuleList) -> int:
        first = stage[0]
        return first.cout if hasattr(first, "cout") else first.ch

    def forward(self, base: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor], hint: Tensor,
                scale: float) -> Tensor:
        cond = base._check_inputs(x, t, cond)
        tokens, mask = cond.get("tokens"), cond.get("token_mask")
        # the control branch
        emb_c = self.cond_embed(t, cond)
        h = self.conv_in(x)
        if tokens is not None:
            tokens = tokens.to(h.dtype)
        h = h + self.hint(hint.to(h.dtype))
        res = [self.zero_skips[0](h)]
        for stage, zero in zip(self.down, self.zero_skips[1:]):
            for layer in stage:
                h = layer(h, emb_c, tokens, mask)
            res.append(zero(h))
        for layer in self.mid:
            h = layer(h, emb_c, tokens, mask)
        mid_res = self.zero_mid(h)
        # the frozen base, residuals added to its skips and middle output (UNet.forward otherwise)
        emb = base.cond_embed(t, cond)
        h = base.conv_in(x)
        skips = [h]
        for stage in base.down:
            for layer in stage:
                h = layer(h, emb, tokens, mask)
            skips.append(h)
        for layer in base.mid:
            h = layer(h, emb, tokens, mask)
        h = h + scale * mid_res
        skips = [s + scale * r for s, r in zip(skips, res)]
        for stage in base.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in stage:
                h = layer(h, emb, tokens, mask)
        return base.conv_out(F.silu(base.norm_out(h)))


class DiTControl(nn.Module):
    """Trainable copies of a DiT's first blocks + zero-initialised hint embedding and outputs."""

    def __init__(self, base: nn.Module, hint_channels: int, blocks: int) -> None:
        super().__init__()
        d, p = base.cfg.hidden_size, base.cfg.patch_size
        n = blocks or max(1, base.cfg.depth // 2)
        if n > base.cfg.depth:
            raise ValueError(f"ControlNet: dit_blocks={n} but the base DiT has {base.cfg.depth} blocks")
        self.hint = _zero(nn.Conv2d(hint_channels, d, kernel_size=p, stride=p))
        self.blocks = nn.ModuleList(copy.deepcopy(base.blocks[i]) for i in range(n))
        self.zero_out = nn.ModuleList(_zero(nn.Linear(d, d)) for _ in range(n))

    def forward(self, base: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor], hint: Tensor,
                scale: float) -> Tensor:
        cond = base._check_inputs(x, t, cond)
        h = base.patch_embed(x).flatten(2).transpose(1, 2)
        h = h + base.pos_embed.to(h.dtype)
        c = base.cond_embed(t, cond)
        rope = (base.rope_cos, base.rope_sin) if base.cfg.rope else None
        tokens, mask = cond.get("tokens"), cond.get("token_mask")
        if tokens is not None:
            tokens = tokens.to(h.dtype)
        hc = h + self.hint(hint.to(h.dtype)).flatten(2).transpose(1, 2)
        for i, block in enumerate(base.blocks):
            h = block(h, c, rope, tokens, mask)
            if i < len(self.blocks):
                hc = self.blocks[i](hc, c, rope, tokens, mask)
                h = h + scale * self.zero_out[i](hc)
        return base.unpatchify(base.final(h, c))


class ControlledNet(nn.Module):
    """The denoiser interface ``net(x, t, cond)`` over the frozen base net (outside the module
    tree) and the trainable branch; the current control map and scale are set by the family."""

    def __init__(self, base_net: nn.Module, branch: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "base_net", base_net)
        self.branch = branch
        self.hint: Tensor | None = None
        self.scale = 1.0

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor | None] | None = None) -> Tensor:
        if self.hint is None:
            return self.base_net(x, t, cond)
        hint = self.hint
        if hint.shape[0] != x.shape[0]:  # one map for all, or the doubled batch of CFG
            if x.shape[0] % hint.shape[0]:
                raise ValueError(f"ControlNet: control batch {hint.shape[0]} does not divide the batch {x.shape[0]}")
            hint = hint.repeat(x.shape[0] // hint.shape[0], 1, 1, 1)
        side = self.base_net.cfg.image_size
        if hint.shape[-1] != side:  # a latent family: the map at the latent grid
            hint = F.interpolate(hint, size=(side, side), mode="area")
        return self.branch(self.base_net, x, t, dict(cond or {}), hint.to(x.device), self.scale)


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state_dict (names, dtypes, shapes, bytes), for 'trained on which base'."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ControlNet(Family):
    name: ClassVar[str] = "controlnet"
    Config: ClassVar[type[FamilyConfig]] = ControlNetConfig
    base_fields: ClassVar[tuple[str, ...]] = _SAME  # must equal the base run's (a preset's are replaced by them)
    # per instance these become the base family's samplers (set in __init__)
    samplers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm", "heun", "euler", "dpmpp_2m", "consistency")
    default_sampler: ClassVar[str] = "ddim"

    cfg: ControlNetConfig

    def __init__(self, cfg: ControlNetConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        if not c.base:
            raise TeacherError("ControlNet: config field base (the base run's checkpoint folder) is empty")
        base = load_family(c.base)
        if not hasattr(base, "net") or base.cfg.net not in ("unet", "dit"):
            raise TeacherError(f"ControlNet: the base {c.base} is a {base.name!r} model on net "
                               f"{getattr(base.cfg, 'net', None)!r}; ControlNet needs a U-Net or DiT denoiser")
        same_fields(c, base.cfg, _SAME, "ControlNet")
        object.__setattr__(self, "_base", base)
        hint_ch = signal_channels(c.signal)
        branch = UNetControl(base.net, hint_ch) if base.cfg.net == "unet" else DiTControl(base.net, hint_ch, c.dit_blocks)
        self.net = ControlledNet(base.net, branch.requires_grad_(True))  # copied from a frozen net
        fp = weights_fingerprint(base)
        self.base_fingerprint = fp
        self.register_buffer("base_id", torch.tensor([int(fp[i:i + 8], 16) for i in range(0, 32, 8)],
                                                     dtype=torch.int64))
        self.samplers = base.samplers
        self.default_sampler, self.default_steps = base.default_sampler, base.default_steps
        self.sampler_options = {k: (*base.sampler_options.get(k, ()), "control", "control_scale")
                                for k in base.samplers}

    @property
    def base(self) -> Any:
        return self.__dict__["_base"]

    def optimizers_spec(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.net.branch.parameters())}

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        base = self.__dict__.get("_base")
        if base is not None:
            base._apply(fn, recurse)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        theirs = state_dict.get("base_id")
        if theirs is not None and not torch.equal(torch.as_tensor(theirs).cpu(), self.base_id.cpu()):
            raise TeacherError(f"ControlNet: these weights were trained on another base run (fingerprint "
                               f"{''.join(f'{int(v):08x}' for v in theirs)[:16]}...), not on {self.cfg.base} "
                               f"({self.base_fingerprint[:16]}...)")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ control

    def control_map(self, images: Tensor) -> Tensor:
        """This ControlNet's control map of images in [-1, 1] (pixels, the base's image size)."""
        c = self.cfg
        return control_map(images, c.signal, c.canny_low, c.canny_high)

    def check_control(self, control: Tensor, n: int) -> Tensor:
        ch = signal_channels(self.cfg.signal)
        side = self._pixel_size()
        if not isinstance(control, Tensor) or control.ndim != 4:
            raise ValueError(f"ControlNet: control must be a map [B, {ch}, {side}, {side}] (control_map(images)), "
                             f"got {tuple(control.shape) if isinstance(control, Tensor) else type(control).__name__}")
        if tuple(control.shape[1:]) != (ch, side, side):
            raise ValueError(f"ControlNet: the control map is {control.shape[2]}x{control.shape[3]} with "
                             f"{control.shape[1]} channels; this ControlNet ({self.cfg.signal}) takes {side}x{side} "
                             f"maps with {ch} channels")
        if control.shape[0] not in (1, n):
            raise ValueError(f"ControlNet: control batch {control.shape[0]} for {n} samples (give 1 or {n})")
        return control.float().to(self.device)

    def _pixel_size(self) -> int:
        if self.cfg.data == "pixels":
            return self.cfg.image_size
        from models.editing import autoencoder

        return autoencoder(self.base).cfg.image_size

    @contextmanager
    def controlling(self, hint: Tensor | None, scale: float) -> Iterator[None]:
        """The base family with its net swapped for the controlled one (hint, scale) meanwhile."""
        base, net = self.base, self.net
        own_net, was_training = base._modules["net"], net.training
        base._modules["net"] = net
        net.hint, net.scale = hint, float(scale)
        try:
            yield
        finally:
            base._modules["net"] = own_net
            net.hint = None
            net.train(was_training)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x = self.check_images(batch)
        pixels = x if self.cfg.data == "pixels" else self.base.decode_latents(x)
        hint = self.control_map(pixels)
        with self.controlling(hint, 1.0):
            return self.base.loss(batch, generator)

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """The base's sampling under control: ``control`` = a map [1|n, C, H, W] (None = the base
        alone), ``control_scale`` (default the config's)."""
        with self.controlled(options.pop("control", None), options.pop("control_scale", None), n) as base:
            return base.sample_result(n, conditioning, sampler, steps, guidance, negative, generator, x_T, **options)

    @contextmanager
    def controlled(self, control: Tensor | None, control_scale: float | None, n: int) -> Iterator[Any]:
        """The base family under ``control`` (a map, None = no control) at ``control_scale``
        (None = the config's): what models/editing.py edits with when given a ControlNet."""
        scale = self.cfg.control_scale if control_scale is None else control_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 10:
            raise ValueError(f"ControlNet.sample: control_scale must be a number in [0, 10], got {scale!r}")
        hint = None if control is None else self.check_control(control, n)
        with self.controlling(hint, scale):
            yield self.base

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        return self.base.run_sampler(net_fn, x_T, sampler, steps, generator, options)
