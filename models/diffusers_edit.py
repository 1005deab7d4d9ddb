"""Editing and control for diffusers pipelines (the ``diffusers:SPEC`` model slot of
models/hf_diffusers.py), through diffusers' own pipelines built on the loaded one's components
(``AutoPipelineFor*.from_pipe``: the same UNet, VAE, text encoder and scheduler, no copy):

* **img2img / SDEdit**: ``AutoPipelineForImage2Image`` (StableDiffusionImg2ImgPipeline, ...) at
  ``strength`` (diffusers' rule: the last ``strength`` share of the steps runs);
* **inpainting**: ``AutoPipelineForInpainting`` with the mask (white = generate); a text-to-image
  UNet (4 latent channels) blends the known latents back at every step, an inpainting UNet (9
  channels) takes the mask and masked image as input;
* **outpainting**: inpainting on a canvas of the pipeline's size with the image placed inside its
  margins (the margins white in the mask, mid-gray in the masked image);
* **DDIM inversion edit**: the image's VAE latents (their mean) walked up the DDIM grid by
  diffusers' ``DDIMInverseScheduler`` under the source prompt (guidance 1, as DiffEdit's
  ``invert`` does), then sampled down by ``DDIMScheduler`` under the target prompt (discrete-time
  UNet pipelines);
* **ControlNet**: a diffusers ``ControlNetModel`` folder (``save_pretrained``, safetensors) passed
  as ``controlnet``: the ControlNet variant of whichever of the three pipelines applies, with the
  control image and ``controlnet_conditioning_scale``.  The control is given as the map itself
  (``control_is_map``: edges, depth, pose, ... exactly as that ControlNet takes it) or as an image
  whose Canny edge map (:func:`canny_control`) is the control, for canny ControlNets.

Textual-inversion embeddings are loaded by the model itself (models/hf_diffusers.py,
``DiffusersModel.add_embedding``), so every mode sees them.

Images go in as PIL images at the model's height x width and come out in [-1, 1]; the NFE is the
UNet calls the loaded model counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.hf_diffusers import DiffusersError, check_weights_folder

MODES = ("sample", "sdedit", "inpaint", "outpaint", "invert")
CANNY_LOW, CANNY_HIGH = 100, 200  # the Canny thresholds of diffusers' ControlNet examples and of models/controlnet.py


def check_controlnet_folder(path: str | Path) -> Path:
    """A diffusers ControlNetModel folder (config.json naming ControlNetModel + safetensors weights)."""
    p = Path(path).expanduser()
    cfg = p / "config.json"
    if not cfg.is_file():
        raise DiffusersError(f"controlnet {p}: not a diffusers ControlNetModel folder (no config.json)")
    cls = json.loads(cfg.read_text()).get("_class_name")
    if cls != "ControlNetModel":
        raise DiffusersError(f"controlnet {p}: config.json names {cls!r}, not a ControlNetModel")
    check_weights_folder(p, f"controlnet {p}")
    return p.resolve()


def load_controlnet(path: str | Path, model: Any) -> Any:
    from diffusers import ControlNetModel

    folder = check_controlnet_folder(path)
    cn = ControlNetModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True,
                                         torch_dtype=model.net.dtype).to(model.device)
    cross = getattr(model.net.config, "cross_attention_dim", None)
    if cross is not None and cn.config.cross_attention_dim != cross:
        raise DiffusersError(f"controlnet {folder}: cross-attention width {cn.config.cross_attention_dim}, the "
                             f"pipeline's UNet has {cross} (a ControlNet for another base model)")
    return cn


def edit_pipeline(model: Any, mode: str, controlnet: Any = None) -> Any:
    """diffusers' pipeline for ``mode`` (sample / sdedit / inpaint), with ``controlnet`` when given,
    sharing the loaded pipeline's components."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    if mode not in MODES:
        raise DiffusersError(f"diffusers editing: unknown mode {mode!r}; one of {list(MODES)}")
    if mode == "sample" and controlnet is None:
        return model.pipe
    auto = {"sample": AutoPipelineForText2Image, "sdedit": AutoPipelineForImage2Image,
            "inpaint": AutoPipelineForInpainting, "outpaint": AutoPipelineForInpainting,
            "invert": AutoPipelineForText2Image}[mode]
    kw: dict[str, Any] = {"controlnet": controlnet} if controlnet is not None else {}
    if mode == "invert":
        from diffusers import DDIMScheduler

        if not model.is_discrete_unet:
            raise DiffusersError(f"invert: the DDIM inversion edit needs a discrete-time UNet pipeline; "
                                 f"{type(model.pipe).__name__} is not one")
        kw["scheduler"] = DDIMScheduler.from_config(model.pipe.scheduler.config)  # its own copy: the loaded one stays
    try:
        pipe = auto.from_pipe(model.pipe, **kw)
    except (ValueError, KeyError) as exc:
        raise DiffusersError(f"{type(model.pipe).__name__} has no diffusers {mode} pipeline"
                             f"{' with a ControlNet' if controlnet is not None else ''} ({exc})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def canny_control(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """The control image a canny ControlNet takes for ``image``: OpenCV Canny edges of its gray
    version (thresholds 100/200, as diffusers' ControlNet examples use), white on black, in 3
    channels.  The same edges as the project's own ControlNets (models.controlnet.control_map)."""
    import cv2

    edges = cv2.Canny(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def outpaint_canvas(image: Image.Image, margins: list[int], fill: int = 128) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) for outpainting: ``image`` inside margins [left, top, right, bottom] of a
    mid-gray canvas; the mask white (generate) on the margins."""
    left, top, right, bottom = margins
    w, h = image.size
    canvas = Image.new("RGB", (w + left + right, h + top + bottom), (fill, fill, fill))
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + w, top + h))
    return canvas, mask


def image_latents(model: Any, image: Image.Image) -> Tensor:
    """[1, C, h, w] VAE latents of ``image`` (the posterior mean), scaled as the UNet takes them."""
    pipe = model.pipe
    x = pipe.image_processor.preprocess(image).to(model.device, pipe.vae.dtype)
    vc = pipe.vae.config
    z = pipe.vae.encode(x).latent_dist.mean
    return (z - (getattr(vc, "shift_factor", None) or 0.0)) * vc.scaling_factor


def ddim_invert(model: Any, latents: Tensor, prompts: list[str], steps: int) -> Tensor:
    """``latents`` walked up the ``steps``-step DDIM grid under ``prompts`` (guidance 1) by
    diffusers' DDIMInverseScheduler: the noise the DDIM sampler maps back to them."""
    from diffusers import DDIMInverseScheduler

    pipe = model.pipe
    inv = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inv.set_timesteps(steps, device=model.device)
    emb, _ = pipe.encode_prompt(prompts, model.device, 1, False)
    z = latents.to(model.device, model.net.dtype)
    for t in inv.timesteps:
        eps = pipe.unet(inv.scale_model_input(z, t), t, encoder_hidden_states=emb).sample
        z = inv.step(eps, t, z).prev_sample
    return z


def to_pil(x: Tensor) -> Image.Image:
    """[1, 3, H, W] or [3, H, W] in [-1, 1] -> RGB image."""
    x = x[0] if x.ndim == 4 else x
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a)


def generate(model: Any, pipe: Any, mode: str, prompts: list[str], negative: list[str] | None, steps: int,
             guidance: float, generator: torch.Generator | None, *, image: Image.Image | None = None,
             mask: Image.Image | None = None, strength: float | None = None, control: Image.Image | None = None,
             control_scale: float = 1.0, latents: Tensor | None = None,
             source: str | None = None) -> tuple[Tensor, int]:
    """One batch from ``pipe`` (see :func:`edit_pipeline`): images in [-1, 1] and the UNet calls.

    ``latents`` is the starting noise of plain (ControlNet) sampling; img2img and inpainting draw
    theirs from ``generator``, as diffusers does; ``invert`` starts from the init image's DDIM
    inversion under ``source`` (None: the empty prompt)."""
    n = len(prompts)
    if mode == "invert":
        if image is None:
            raise DiffusersError("diffusers invert: needs the init image")
        model._calls = 0
        with torch.no_grad():
            z = ddim_invert(model, image_latents(model, image), [source or ""], steps)
        latents, calls, mode = z.expand(n, -1, -1, -1).float(), model._calls, "sample"
    else:
        calls = 0
    if mode == "outpaint":
        mode = "inpaint"  # on the canvas (outpaint_canvas), whose margins the mask generates
    kw: dict[str, Any] = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                              generator=generator, height=model.height, width=model.width)
    if negative is not None:
        kw["negative_prompt"] = negative
    if mode == "sample":
        if latents is not None:
            kw["latents"] = latents.to(model.device, model.net.dtype)
    else:
        if image is None:
            raise DiffusersError(f"diffusers {mode}: needs the init image")
        kw["image"] = [image] * n
        kw["strength"] = float(strength if strength is not None else 1.0)
        if mode == "inpaint":
            if mask is None:
                raise DiffusersError("diffusers inpaint: needs the mask")
            kw["mask_image"] = [mask] * n
    if control is not None:
        key = "image" if mode == "sample" else "control_image"
        kw[key] = [control] * n
        kw["controlnet_conditioning_scale"] = float(control_scale)
    model._calls = 0
    with torch.no_grad():
        out = pipe(**kw).images
    return (out.float() * 2 - 1).clamp(-1, 1).cpu(), int(model._calls) + calls
