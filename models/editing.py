"""Editing that falls out of the samplers: img2img / SDEdit, inpainting and outpainting, and the
DDIM-inversion edit, for every diffusion and flow family (pixels or latents).

Stateless functions of (family, images, ...), in the style of models/samplers.py: each builds the
family's own sampling grid, then calls the family's own stateless sampler on part of it.

* **SDEdit** (Meng et al. 2022, "SDEdit"): put the input at the noise level of grid point
  k = N - int(N s) (the rule of diffusers' img2img pipelines), then run the sampler over the last
  int(N s) steps.  s = 0 runs no step and returns the input (through the autoencoder for latent
  families); s = 1 starts from the prior's noise itself and is plain sampling with that noise.
* **Inpainting** (the "blended" scheme of Avrahami et al. 2022 and RePaint, Lugmayr et al. 2022):
  before every network evaluation at level l the known region of the state is replaced by the
  input noised to l (one fixed noise draw), and the result's known region is the input exactly.
  Every built-in sampler updates the state pixel by pixel from (state, network output), so the
  generated region evolves as if the state itself had been re-imposed after each step.
  ``resample=r`` adds RePaint's resampling: each step is taken r times, jumping back to the
  higher level with the forward transition q(x_hi | x_lo) in between (one-step samplers only).
* **Outpainting** = inpainting on a canvas of the model's size around the known image.
* **Inversion edit** (Song et al. 2021 Sec. 4.3; Mokady et al. 2023's baseline): the
  deterministic sampler run backwards under the source prompt (samplers.ddim_invert for DDPM
  families, the same explicit Euler walk for flow and EDM), then sampling under the new prompt.

Masks: 1 = generate, 0 = keep (the diffusers / SD-inpainting convention), shape [B|1, 1, H, W]
at the image's size.  Latent families see the mask max-pooled to the latent grid (a latent cell
is kept only if all its pixels are known).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.diffusion import flow_interpolate, karras_sigmas, respace
from models.samplers import (
    ddim,
    ddim_invert,
    ddpm_ancestral,
    ddpm_step,
    dpmpp_2m,
    edm_euler,
    edm_heun,
    flow_euler,
    flow_heun,
    flow_timesteps,
)


class EditError(ValueError):
    """An edit that cannot run as asked (says what and where)."""


# ----------------------------------------------------------------------------- the family's grid


@dataclass
class _Grid:
    """A family's sampling grid in one of three conventions, and how to walk part of it.

    kind "discrete": levels = training timesteps (descending), the last step lands on clean data;
    kind "sigma":    levels = EDM sigmas, last 0;  kind "flow": levels = times 1 -> 0;
    kind "consistency": levels = the consistency sampler's sigmas (no final 0).
    ``model`` is the (conditioned, guided) callable in the sampler's convention.
    """

    kind: str
    levels: Tensor
    model: Callable[..., Tensor]
    run: Callable[[Callable[..., Tensor], Tensor, int, int, Any], Tensor]  # (fn, x, i, j, gen): levels i -> j
    one_step: bool  # the sampler's step i depends only on (x_i, level i, level i+1)
    alphas_cumprod: Tensor | None = None

    @property
    def steps(self) -> int:
        return self.levels.numel() if self.kind in ("discrete", "consistency") else self.levels.numel() - 1

    def ab(self, i: int) -> float:
        """alpha-bar of grid point i (discrete); grid point `steps` is clean data (1)."""
        assert self.alphas_cumprod is not None
        return 1.0 if i >= self.levels.numel() else float(self.alphas_cumprod[int(self.levels[i])])

    def noised(self, x0: Tensor, eps: Tensor, i: int) -> Tensor:
        """q(x at grid point i | x0) with the noise ``eps``."""
        if self.kind == "discrete":
            a = self.ab(i)
            return math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        s = float(self.levels[i]) if i < self.levels.numel() else 0.0
        if self.kind == "flow":
            return flow_interpolate(x0, eps, s).to(x0.dtype)
        return x0 + s * eps

    def noised_at(self, x0: Tensor, eps: Tensor, level: Tensor) -> Tensor:
        """The same at the per-sample level the sampler passes to the model (t, sigma or time)."""
        lv = torch.as_tensor(level).reshape(-1).to(torch.float64).cpu()
        shape = (-1,) + (1,) * (x0.ndim - 1)
        if self.kind == "discrete":
            assert self.alphas_cumprod is not None
            a = self.alphas_cumprod[lv.round().long()].reshape(shape).to(x0)
            return a.sqrt() * x0 + (1 - a).sqrt() * eps
        s = lv.reshape(shape).to(x0)
        if self.kind == "flow":
            return (1 - s) * x0 + s * eps
        return x0 + s * eps

    def jump(self, x: Tensor, i: int, z: Tensor) -> Tensor:
        """RePaint's jump back: x at grid point i + 1 -> a draw of q(x at grid point i | x)."""
        if self.kind == "discrete":
            r = self.ab(i) / self.ab(i + 1)
            return math.sqrt(r) * x + math.sqrt(1 - r) * z
        hi, lo = float(self.levels[i]), float(self.levels[i + 1])
        if self.kind == "flow":
            k = (1 - hi) / (1 - lo)
            return k * x + math.sqrt(max(hi**2 - (k * lo) ** 2, 0.0)) * z
        return x + math.sqrt(max(hi**2 - lo**2, 0.0)) * z


def _grid(family: Any, net_fn: Callable[..., Tensor], sampler: str, steps: int, options: dict[str, Any]) -> _Grid:
    from models.consistency import ConsistencyFunction
    from models.ddpm import DDPM
    from models.dmd import DMD
    from models.edm import EDM
    from models.flow import FlowMatching

    name = type(family).__name__
    if isinstance(family, DMD):
        raise EditError(f"{name}: a one-step generator has no intermediate noise level to start an edit from; "
                        "edit with its flow teacher instead")
    if isinstance(family, DDPM):
        ab, c = family.alphas_cumprod, family.cfg
        ts = respace(ab, steps, c.spacing)
        clip = 1.0 if c.data == "pixels" else None
        pred = c.prediction
        eta = float(options.get("eta", getattr(c, "eta", 0.0)))

        def run_d(fn: Callable[..., Tensor], x: Tensor, i: int, j: int, gen: Any) -> Tensor:
            final = 1.0 if j >= len(ts) else float(ab[ts[j]])
            sub = ts[i:j]
            if sampler == "ddpm":
                if j >= len(ts):
                    return ddpm_ancestral(fn, x, ab, sub, pred=pred, generator=gen, clip_denoised=clip).sample
                for k in range(i, j):  # ancestral steps that do not end on the data keep their noise
                    t = int(ts[k])
                    out = fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
                    a_prev = 1.0 if k + 1 >= len(ts) else float(ab[ts[k + 1]])
                    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
                    x, _ = ddpm_step(x, out, float(ab[t]), a_prev, pred, noise, "beta_tilde", clip)
                return x
            return ddim(fn, x, ab, sub, eta=eta, pred=pred, generator=gen, clip_denoised=clip,
                        final_alpha_cumprod=final).sample

        return _Grid("discrete", ts, net_fn, run_d, True, ab)
    if isinstance(family, ConsistencyFunction):
        c = family.cfg
        levels = karras_sigmas(steps + 1, c.sigma_min, c.sigma_max, c.rho)[:-2]

        def f(x: Tensor, sigma: Tensor) -> Tensor:
            return family.consistency(net_fn, x, sigma)

        def run_c(fn: Callable[..., Tensor], x: Tensor, i: int, j: int, gen: Any) -> Tensor:
            B = x.shape[0]
            x0 = fn(x, torch.full((B,), float(levels[i]), device=x.device))
            for s in levels[i + 1:j].tolist():
                noise = torch.randn(x.shape, generator=gen, device=gen.device if gen else x.device,
                                    dtype=x.dtype).to(x.device)
                x = x0 + math.sqrt(max(s**2 - c.sigma_min**2, 0.0)) * noise
                x0 = fn(x, torch.full((B,), s, device=x.device))
            return x0

        return _Grid("consistency", levels, f, run_c, False)
    if isinstance(family, EDM):
        c = family.cfg
        sigmas = karras_sigmas(steps, c.sigma_min, c.sigma_max, c.rho)
        churn = {"s_churn": c.s_churn, **options}

        def run_s(fn: Callable[..., Tensor], x: Tensor, i: int, j: int, gen: Any) -> Tensor:
            sub = sigmas[i:j + 1]
            if sampler == "dpmpp_2m":
                return dpmpp_2m(fn, x, sub).sample
            walk = edm_heun if sampler == "heun" else edm_euler
            # the churn gamma is s_churn / N per step: keep N the full grid's
            kw = {**churn, "s_churn": float(churn["s_churn"]) * (sub.numel() - 1) / steps}
            return walk(fn, x, sub, generator=gen, **kw).sample

        return _Grid("sigma", sigmas, family.denoiser(net_fn), run_s, sampler != "dpmpp_2m")
    if isinstance(family, FlowMatching):
        ts = flow_timesteps(steps, float(options.get("shift", family.cfg.shift)))

        def run_f(fn: Callable[..., Tensor], x: Tensor, i: int, j: int, gen: Any) -> Tensor:
            return (flow_euler if sampler == "euler" else flow_heun)(fn, x, ts[i:j + 1]).sample

        return _Grid("flow", ts, net_fn, run_f, True)
    raise EditError(f"{name}: editing supports the DDPM, EDM, consistency and flow families (and their "
                    f"distilled students); {family.name!r} samples some other way")


# ----------------------------------------------------------------------------- shared setup


def _setup(family: Any, n: int, conditioning: Any, sampler: str | None, steps: int | None, guidance: float,
           negative: Any, options: dict[str, Any]) -> tuple[str, int, Callable[..., Tensor]]:
    sampler, steps = family._check_sampling(sampler, steps, guidance, conditioning, negative, options)
    where = f"{type(family).__name__}.edit"
    cond = family.null_condition(n) if conditioning is None else family.condition_from(conditioning, n, where)
    uncond = family.null_condition(n) if negative is None else family.condition_from(negative, n, where + " negative")
    return sampler, steps, family.guided_net(cond, uncond, float(guidance))


def _check_image(family: Any, images: Tensor, what: str = "init image") -> Tensor:
    name = type(family).__name__
    c, s = family.cfg.channels, family.cfg.image_size
    if family.cfg.data == "latents":
        ae = autoencoder(family)
        c, s = ae.cfg.channels, ae.cfg.image_size
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim != 4:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise EditError(f"{name}: the {what} must be a float tensor [B, {c}, {s}, {s}] in [-1, 1], got {desc}")
    if tuple(images.shape[1:]) != (c, s, s):
        h, w = int(images.shape[2]), int(images.shape[3])
        f = s // family.cfg.image_size  # the autoencoder's factor (1 for pixel families)
        m = family.size_multiple()
        # an any-size family edits at any size it samples at (an aspect bucket's, an extended canvas)
        if not (images.shape[1] == c and m and h % (m * f) == 0 and w % (m * f) == 0):
            other = f", or sides that are multiples of {m * f}" if m else ""
            raise EditError(f"{name}: the {what} is {h}x{w} with {images.shape[1]} "
                            f"channels, the model makes {s}x{s} images{other} with {c} channels")
    lo, hi = float(images.min()), float(images.max())
    if not (lo >= -1.001 and hi <= 1.001):
        raise EditError(f"{name}: the {what} must lie in [-1, 1], got min {lo:.4g} max {hi:.4g}")
    return images.to(family.device)


def _batch(images: Any) -> int:
    return int(images.shape[0]) if isinstance(images, Tensor) and images.ndim == 4 else 1


def _check_strength(strength: Any, where: str) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise EditError(f"{where}: strength must be a number in [0, 1] (0 = the input, 1 = plain sampling), "
                        f"got {strength!r}")
    return float(strength)


def autoencoder(family: Any) -> Any:
    """The frozen autoencoder of a latent family (loaded once, outside the module tree)."""
    ae = family.__dict__.get("_autoencoder")
    if ae is None:
        if not family.cfg.autoencoder:
            raise EditError(f"{type(family).__name__}: data='latents' without an autoencoder: cannot encode images")
        from models.checkpoint import load_family

        ae = load_family(str(family.cfg.autoencoder), device=family.device)
        family.attach_autoencoder(ae)
    if hasattr(ae, "decode_tokens"):
        raise EditError(f"{type(family).__name__}: its latents are token ids of {ae.name!r}; editing needs a "
                        "continuous autoencoder")
    return ae


def encode(family: Any, images: Tensor) -> Tensor:
    """Images in [-1, 1] -> what the family samples (the images, or scaled posterior means)."""
    if family.cfg.data == "pixels":
        return images
    ae = autoencoder(family)
    with torch.no_grad():
        mu, _ = ae.encode(images.to(ae.device))
    return (mu * family.cfg.latent_scale).to(family.device)


def _finish(family: Any, x: Tensor) -> Tensor:
    if family.cfg.data == "pixels":
        return x.clamp(-1, 1)
    return family.decode_latents(x)


def _noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    from models.base import randn

    return randn(shape, generator, device)


def _start_index(steps: int, strength: float) -> int:
    return steps - min(int(steps * strength), steps)


def _prior_start(g: _Grid, family: Any, noise: Tensor) -> Tensor:
    return noise * family.cfg.sigma_max if g.kind in ("sigma", "consistency") else noise


def _sampling(family: Any) -> Any:
    class _Mode:
        def __enter__(self) -> None:
            self.was = family.training
            family.eval()
            self.ng = torch.no_grad()
            self.ng.__enter__()

        def __exit__(self, *exc: Any) -> None:
            self.ng.__exit__(*exc)
            family.train(self.was)

    return _Mode()


# ----------------------------------------------------------------------------- SDEdit


def sdedit(family: Any, images: Tensor, strength: float, conditioning: Any = None, *, sampler: str | None = None,
           steps: int | None = None, guidance: float = 1.0, negative: Any = None,
           generator: torch.Generator | None = None, noise: Tensor | None = None, **options: Any) -> Tensor:
    """img2img / SDEdit: ``images`` (in [-1, 1], the model's image size) noised to the grid point
    of ``strength`` and sampled from there with the family's sampler.  ``noise``: the unit
    Gaussian used (default drawn from ``generator``); with strength 1 it is exactly the x_T of
    ``family.sample``."""
    if hasattr(family, "controlled"):  # a ControlNet: edit its base under the control map
        with family.controlled(options.pop("control", None), options.pop("control_scale", None),
                               _batch(images)) as base:
            return sdedit(base, images, strength, conditioning, sampler=sampler, steps=steps, guidance=guidance,
                          negative=negative, generator=generator, noise=noise, **options)
    where = f"{type(family).__name__}.sdedit"
    s = _check_strength(strength, where)
    x_img = _check_image(family, images)
    n = x_img.shape[0]
    sampler, steps, fn = _setup(family, n, conditioning, sampler, steps, guidance, negative, options)
    with _sampling(family):
        x0 = encode(family, x_img)
        g = _grid(family, fn, sampler, steps, options)
        eps = _noise(tuple(x0.shape), generator, x0.device) if noise is None else noise.to(x0)
        if eps.shape != x0.shape:
            raise EditError(f"{where}: noise must have shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
        k = _start_index(g.steps, s)
        if k >= g.steps:
            return x_img.clamp(-1, 1) if family.cfg.data == "pixels" else _finish(family, x0)
        x = _prior_start(g, family, eps) if k == 0 else g.noised(x0, eps, k)
        return _finish(family, g.run(g.model, x, k, g.steps, generator))


# ----------------------------------------------------------------------------- inpainting


def check_mask(mask: Tensor, images: Tensor, where: str) -> Tensor | None:
    """A {0, 1} float mask [B|1, 1, H, W] at the image's size (1 = generate); None when it is all
    zeros (nothing to generate).  All ones is plain sampling, handled by the caller."""
    if not isinstance(mask, Tensor) or mask.ndim not in (2, 3, 4):
        raise EditError(f"{where}: mask must be a tensor [H, W], [B, H, W] or [B, 1, H, W], got "
                        f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    m = mask.float()
    m = m[None, None] if m.ndim == 2 else (m[:, None] if m.ndim == 3 else m)
    if m.shape[-2:] != images.shape[-2:]:
        raise EditError(f"{where}: the mask is {m.shape[-2]}x{m.shape[-1]}, the image is "
                        f"{images.shape[-2]}x{images.shape[-1]}")
    if m.shape[1] != 1 or m.shape[0] not in (1, images.shape[0]):
        raise EditError(f"{where}: mask must have one channel and batch 1 or {images.shape[0]}, got {tuple(m.shape)}")
    if not torch.all((m == 0) | (m == 1)):
        raise EditError(f"{where}: mask values must be 0 (keep) or 1 (generate)")
    if not bool(m.any()):
        return None
    return m.expand(images.shape[0], 1, *images.shape[-2:]).to(images.device)


@dataclass
class InpaintResult:
    sample: Tensor
    trivial: str | None = None  # "nothing to generate" / "everything generated" for an all-0 / all-1 mask


def inpaint(family: Any, images: Tensor, mask: Tensor, conditioning: Any = None, *, strength: float = 1.0,
            resample: int = 1, sampler: str | None = None, steps: int | None = None, guidance: float = 1.0,
            negative: Any = None, generator: torch.Generator | None = None, noise: Tensor | None = None,
            paste: bool = False, **options: Any) -> InpaintResult:
    """Generate where ``mask`` is 1 and keep ``images`` where it is 0, re-imposing the known region
    at every network evaluation (see the module docstring).  Pixel families keep the known pixels
    exactly; latent families keep the known latents exactly and, with ``paste``, also paste the
    known pixels after decoding.  ``strength`` < 1 starts the generated region from the noised
    input too (SDEdit inside the mask).  ``resample`` = RePaint's r (one-step samplers only).
    An all-zeros mask returns the input, an all-ones mask is plain SDEdit at ``strength``; the
    result says which (``trivial``)."""
    if hasattr(family, "controlled"):  # a ControlNet: inpaint with its base under the control map
        with family.controlled(options.pop("control", None), options.pop("control_scale", None),
                               _batch(images)) as base:
            return inpaint(base, images, mask, conditioning, strength=strength, resample=resample, sampler=sampler,
                           steps=steps, guidance=guidance, negative=negative, generator=generator, noise=noise,
                           paste=paste, **options)
    where = f"{type(family).__name__}.inpaint"
    s = _check_strength(strength, where)
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise EditError(f"{where}: resample must be an int >= 1 (1 = no resampling), got {resample!r}")
    x_img = _check_image(family, images)
    m = check_mask(mask, x_img, where)
    if m is None:
        return InpaintResult(x_img.clamp(-1, 1) if family.cfg.data == "pixels" else _finish(family, encode(family, x_img)),
                             "the mask is all zeros: nothing to generate, the input is returned")
    if bool(m.all()):
        out = sdedit(family, x_img, s, conditioning, sampler=sampler, steps=steps, guidance=guidance,
                     negative=negative, generator=generator, noise=noise, **options)
        return InpaintResult(out, "the mask is all ones: everything is generated (plain sampling at this strength)")
    n = x_img.shape[0]
    sampler, steps, fn = _setup(family, n, conditioning, sampler, steps, guidance, negative, options)
    with _sampling(family):
        x0 = encode(family, x_img)
        keep = (F.adaptive_max_pool2d(m, x0.shape[-2:]) == 0) if x0.shape[-2:] != m.shape[-2:] else (m == 0)
        g = _grid(family, fn, sampler, steps, options)
        if resample > 1 and not g.one_step:
            raise EditError(f"{where}: resample={resample} needs a one-step sampler; {sampler!r} is not one")
        eps = _noise(tuple(x0.shape), generator, x0.device) if noise is None else noise.to(x0)
        if eps.shape != x0.shape:
            raise EditError(f"{where}: noise must have shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
        model = g.model

        def blended(x: Tensor, level: Tensor, **extra: Any) -> Tensor:
            return model(torch.where(keep, g.noised_at(x0, eps, level), x), level, **extra)

        k = _start_index(g.steps, s)
        if k >= g.steps:
            out = x0
        else:
            x = _prior_start(g, family, eps) if k == 0 else g.noised(x0, eps, k)
            if resample == 1:
                x = g.run(blended, x, k, g.steps, generator)
            else:
                for i in range(k, g.steps):
                    reps = resample if i + 1 < g.steps else 1  # the last step lands on the data: no jump back
                    for u in range(reps):
                        x_next = g.run(blended, x, i, i + 1, generator)
                        if u + 1 < reps:
                            x = g.jump(x_next, i, _noise(tuple(x.shape), generator, x.device))
                    x = x_next
            out = torch.where(keep, x0, x)
        img = _finish(family, out)
        if family.cfg.data == "pixels" or paste:
            img = torch.where(m == 0, x_img, img)
        return InpaintResult(img)


def outpaint(family: Any, images: Tensor, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
             conditioning: Any = None, **kw: Any) -> InpaintResult:
    """Extend ``images`` by the given margins: inpainting on a canvas of the model's size with the
    input at (top, left) and the margins to generate.  The canvas must be the model's size, or for
    an any-size family (``size_multiple``) any size it samples at (an extended canvas)."""
    where = f"{type(family).__name__}.outpaint"
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (left, top, right, bottom)):
        raise EditError(f"{where}: margins must be ints >= 0, got left={left} top={top} right={right} bottom={bottom}")
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise EditError(f"{where}: images must be a tensor [B, C, h, w]")
    b, c, h, w = images.shape
    size = family.cfg.image_size if family.cfg.data == "pixels" else autoencoder(family).cfg.image_size
    H, W = h + top + bottom, w + left + right
    if (H, W) != (size, size) and not family.size_multiple():
        raise EditError(f"{where}: the image ({h}x{w}) with its margins is a {H}x{W} canvas; the model makes "
                        f"{size}x{size} images")  # (an any-size family's canvas is checked by inpaint)
    canvas = torch.zeros((b, c, H, W), dtype=images.dtype, device=images.device)
    canvas[:, :, top:top + h, left:left + w] = images
    mask = torch.ones((1, 1, H, W), device=images.device)
    mask[:, :, top:top + h, left:left + w] = 0
    return inpaint(family, canvas, mask, conditioning, **kw)


# ----------------------------------------------------------------------------- inversion edit


def invert(family: Any, images: Tensor, conditioning: Any = None, *, steps: int | None = None,
           fixed_point_iters: int = 0) -> Tensor:
    """The unit-scale x_T from which the family's deterministic sampler (DDIM, Euler) returns to
    ``images`` under ``conditioning`` (no guidance), as ``family.sample(x_T=...)`` takes it."""
    from models.ddpm import DDPM
    from models.edm import EDM
    from models.flow import FlowMatching

    name = type(family).__name__
    x_img = _check_image(family, images)
    n = x_img.shape[0]
    sampler = {DDPM: "ddim", EDM: "euler", FlowMatching: "euler"}
    kind = next((k for k in sampler if isinstance(family, k)), None)
    from models.consistency import ConsistencyFunction
    from models.dmd import DMD

    if kind is None or isinstance(family, (ConsistencyFunction, DMD)) or sampler[kind] not in family.samplers:
        raise EditError(f"{name}: inversion needs a deterministic DDIM/Euler sampler (DDPM, EDM, flow families)")
    _, steps, fn = _setup(family, n, conditioning, sampler[kind], steps, 1.0, None, {})
    with _sampling(family):
        x = encode(family, x_img)
        if kind is DDPM:
            ts = respace(family.alphas_cumprod, steps, family.cfg.spacing)
            return ddim_invert(fn, x, family.alphas_cumprod, ts, pred=family.cfg.prediction,
                               fixed_point_iters=fixed_point_iters).sample
        B = x.shape[0]
        if kind is FlowMatching:
            ts = flow_timesteps(steps, family.cfg.shift).tolist()[::-1]  # 0 -> 1
            for lo, hi in zip(ts, ts[1:]):
                x = x + (hi - lo) * fn(x, torch.full((B,), lo, dtype=x.dtype, device=x.device))
            return x
        D = family.denoiser(fn)
        sig = karras_sigmas(steps, family.cfg.sigma_min, family.cfg.sigma_max, family.cfg.rho).tolist()[::-1]
        s_eval = sig[1]  # the first step leaves the data (sigma 0): evaluate at the lowest positive level
        for lo, hi in zip(sig, sig[1:]):
            e = max(lo, s_eval)
            d = (x - D(x, torch.full((B,), e, dtype=x.dtype, device=x.device))) / e
            x = x + (hi - lo) * d
        return x / family.cfg.sigma_max


def invert_edit(family: Any, images: Tensor, source: Any, target: Any, *, steps: int | None = None,
                guidance: float = 1.0, negative: Any = None, fixed_point_iters: int = 0,
                control: Tensor | None = None, control_scale: float | None = None) -> Tensor:
    """DDIM-inversion edit: invert ``images`` under the ``source`` prompt/label, then sample from
    that x_T under ``target`` (with guidance) with the same deterministic sampler.  A ControlNet
    takes ``control=`` / ``control_scale=`` (used for both walks)."""
    if hasattr(family, "controlled"):
        with family.controlled(control, control_scale, _batch(images)) as base:
            return invert_edit(base, images, source, target, steps=steps, guidance=guidance, negative=negative,
                               fixed_point_iters=fixed_point_iters)
    x_T = invert(family, images, source, steps=steps, fixed_point_iters=fixed_point_iters)
    sampler = "ddim" if "ddim" in family.samplers else "euler"
    opts = {"eta": 0.0} if sampler == "ddim" and "eta" in family.sampler_options.get("ddim", ()) else {}
    return family.sample(images.shape[0], target, sampler=sampler, steps=steps, guidance=guidance,
                         negative=negative, x_T=x_T, **opts)


__all__ = ["EditError", "InpaintResult", "autoencoder", "check_mask", "encode", "inpaint", "invert",
           "invert_edit", "outpaint", "sdedit"]
