"""Editing and control for ``imagegen sample``: the request's input files checked before any work,
and the one generation call per batch (models/editing.py, models/controlnet.py, models/lora.py,
models/personalize.py do the work).

Modes, from the request's fields (imagegen/sample.py's SampleRequest):

* plain sampling (no ``init_image``);
* **SDEdit** (``init_image`` [+ ``strength``, default 0.8]);
* **inpainting** (``init_image`` + ``mask``: white = generate, black = keep, the SD-inpainting
  convention; ``strength`` default 1, ``resample`` = RePaint's r) and **outpainting**
  (``init_image`` + ``outpaint`` = [left, top, right, bottom] margins: the image on a canvas of
  the model's size, the margins generated; or give an already extended canvas and its mask);
  a trained inpainting run (family ``inpainting``) takes the same two and samples with its mask
  channels instead;
* **inversion edit** (``init_image`` + ``invert``: DDIM / Euler inversion under
  ``source_prompt``, then sampling under the request's prompt);
* **ControlNet** (``control`` = an image whose map the ControlNet computes with its own signal,
  or the map itself with ``control_is_map``: a grayscale image for Canny, a ``.npy`` [C, H, W]
  for any signal), with a ControlNet run as ``run`` or ``controlnet`` over ``run`` (its base);
  combines with every mode above except the trained inpainting family;
* **LoRA** (``loras`` = ["PATH[:SCALE]", ...]: peft adapter folders written by models/lora.save_lora
  on the project's nets, or ``run:<id>`` of a personalize LoRA run of this run; several are merged
  at their scales) and **textual-inversion** embeddings (``embedding`` = [learned_embeds.safetensors
  of models/personalize.py, or ``run:<id>`` of a personalize textual-inversion run, ...]; one new
  token each, all active at once).

Every input file is identified by its sha256 in the sample id and the PNG parameters chunk.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagegen.hashing import file_sha256

SDEDIT_STRENGTH = 0.8  # diffusers' img2img default
LORA_CONFIG, LORA_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _edit_inputs(plan: Any) -> dict[str, Any]:
    """The part of an edit's record every plan shares: its mode and the inputs it was given."""
    return {"mode": plan.mode, "init_image": plan.inputs.get("init_image"), "strength": plan.strength,
            "mask": plan.inputs.get("mask"), "mask_generate_fraction": plan.inputs.get("mask_generate_fraction")}


class EditInputError(ValueError):
    """An editing / control input that cannot be used (says which file and why)."""


def parse_lora(text: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` -> (path, scale): the one spec parser of diffusers and own-net adapters."""
    from models.hf_diffusers import parse_lora as parse

    return parse(text)


def _state_config(ckpt: str | Path) -> dict[str, Any]:
    p = Path(ckpt) / "state.json"
    if not p.is_file():
        raise EditInputError(f"checkpoint {ckpt} has no state.json")
    return json.loads(p.read_text()).get("config", {})


def pixel_size(family: str, model: dict[str, Any]) -> int:
    """The image side a run makes (its autoencoder's for latent runs; the base's for a ControlNet)."""
    if family == "controlnet" and model.get("base") and model.get("data") == "latents":
        base = _state_config(model["base"])
        return pixel_size(base.get("family", ""), base.get("model", {}))
    if model.get("data", "pixels") == "latents":
        ae = model.get("autoencoder")
        if not ae:
            raise EditInputError("a latent run without an autoencoder cannot edit images")
        return int(_state_config(ae).get("model", {}).get("image_size", 0))
    return int(model.get("image_size", 0))


def _net_weight_shapes(ckpt: str | Path) -> dict[str, tuple[int, ...]]:
    """{module: weight shape} of a checkpoint's denoiser net (``model/net.*.weight``), from the
    safetensors header alone."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(Path(ckpt) / "tensors.safetensors"), framework="pt") as f:
        for k in f.keys():
            if k.startswith("model/net.") and k.endswith(".weight"):
                out[k[len("model/net."):-len(".weight")]] = tuple(f.get_slice(k).get_shape())
    return out


def _ema_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as load_family takes them: EMA shadows where present, else raw."""
    raw = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    if meta.get("has_ema"):
        raw.update({k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")})
    return raw


def _same_checkpoint(a: Path, b: Path) -> bool:
    """Two checkpoint folders are the same one (path, or recorded tensors sha256)."""
    if a.resolve() == b.resolve():
        return True
    sha = []
    for p in (a, b):
        st = p / "state.json"
        sha.append(json.loads(st.read_text()).get("tensors_sha256") if st.is_file() else None)
    return sha[0] is not None and sha[0] == sha[1]


def _open_image(path: str, what: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise EditInputError(f"{what} {p} does not exist")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise EditInputError(f"{what} {p} is not an image PIL can read ({exc})") from None


def _to_tensor(im: Image.Image) -> torch.Tensor:
    a = np.asarray(im.convert("RGB"), dtype=np.float32)
    return (torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1)[None]


def _file_id(path: str) -> dict[str, Any]:
    return {"file": Path(path).name, "sha256": file_sha256(Path(path))}


def _edit_kind(family_cls: Any) -> tuple[bool, bool]:
    """(can SDEdit / inpaint, can invert) for a family class."""
    from models.consistency import ConsistencyFunction
    from models.ddpm import DDPM
    from models.dmd import DMD
    from models.edm import EDM
    from models.flow import FlowMatching

    if issubclass(family_cls, DMD):
        return False, False
    editable = issubclass(family_cls, (DDPM, EDM, FlowMatching, ConsistencyFunction))
    return editable, editable and not issubclass(family_cls, ConsistencyFunction)


def bucket_size(width: int | None, height: int | None, run_id: str, fam_name: str, model: dict[str, Any],
                side: int, controlnet: bool = False) -> tuple[int, int]:
    """(h, w) a run's family samples at for an output of ``width`` x ``height`` pixels (None = the
    run's ``side``), checked before any model loads: an any-size family (DDPM, EDM, flow, not
    REPA), sides multiples of its net's patch / downsampling (times the autoencoder's factor for a
    latent run).  Raises EditInputError naming the multiple."""
    from models.registry import get_family

    W, H = width or side, height or side
    fam_cls = get_family(fam_name)
    if fam_name == "controlnet" or controlnet:
        raise EditInputError(f"height/width {W}x{H}: a ControlNet samples at its base's {side}x{side} only")
    if not getattr(fam_cls, "any_size", False) or model.get("repa"):
        what = f"a {fam_name!r} run" + (" with REPA" if model.get("repa") else "")
        raise EditInputError(f"height/width {W}x{H}: run {run_id} is {what}, which samples only at {side}x{side}; "
                             "other (aspect-bucket) sizes need a DDPM, EDM or flow run")
    cfg = fam_cls.Config(**model)
    net = cfg.net_config(8, 1.0)
    multiple = int(getattr(net, "patch_size", 0) or 2 ** (len(net.channel_mult) - 1))
    factor = side // int(cfg.image_size) if cfg.data == "latents" else 1
    m = multiple * factor
    if H % m or W % m:
        why = f"the {cfg.net} {'patch' if cfg.net == 'dit' else 'downsampling'} {multiple}" + (
            f" x the autoencoder's factor {factor}" if factor > 1 else "")
        raise EditInputError(f"height/width {W}x{H} (width x height): run {run_id} samples sides that are "
                             f"multiples of {m} ({why}); e.g. {max(m, W // m * m)}x{max(m, H // m * m)}")
    return H // factor, W // factor


class EditPlan:
    """The request's editing / control inputs, read and checked against the run (no model loaded)."""

    def __init__(self, req: Any, prep: Any) -> None:
        from imagegen.train.runs import get_run
        from models.registry import get_family

        self.req = req
        run_id = prep.run.id
        # the checkpoint's own config: the run card may hold references as given ('run:<id>', 'world')
        fam_name, model = prep.family_name, _state_config(prep.run.checkpoint).get("model", prep.train_cfg.model)
        self.controlnet_run = None
        self.is_controlnet = fam_name == "controlnet"
        self.trained_inpainting = fam_name == "inpainting"
        base_family = fam_name
        if req.controlnet is not None:
            if self.is_controlnet:
                raise EditInputError(f"run {run_id} is itself a ControlNet; give its base as run or drop controlnet")
            cn = get_run(prep.root, req.controlnet)
            cn_family = cn.card.get("config", {}).get("family")
            if cn_family != "controlnet":
                raise EditInputError(f"controlnet={req.controlnet!r}: run {cn.id} is a {cn_family!r} run, not a ControlNet")
            if cn.checkpoint is None:
                raise EditInputError(f"ControlNet run {cn.id} has no checkpoint yet")
            self._check_base(cn, prep)
            self.controlnet_run = cn
            self.cn_model = _state_config(cn.checkpoint).get("model", {})
        elif self.is_controlnet:
            self.cn_model = model
            base_family = _state_config(model["base"]).get("family", "")
        if fam_name == "personalize":  # edited as its base's family (the tuned net, its embedding active)
            base_family = _state_config(model["base"]).get("family", "")
        if req.control is not None and not (self.is_controlnet or self.controlnet_run is not None):
            raise EditInputError(f"control= needs a ControlNet: run {run_id} is a {fam_name!r} run; give "
                                 "controlnet=RUN (a ControlNet trained on it) or a ControlNet run as run")
        if self.controlnet_run is not None and req.control is None:
            raise EditInputError(f"controlnet={req.controlnet!r} without control= (the control image) does nothing")
        side = pixel_size(fam_name, model)
        self.side = side
        # the output size: the run's square, or an aspect-bucket size of an any-size family
        self.width, self.height = req.width or side, req.height or side
        self.latent_size: tuple[int, int] | None = None  # (h, w) the family samples at, None = its square
        W0, H0 = self.width, self.height
        if (W0, H0) != (side, side):
            self.latent_size = bucket_size(req.width, req.height, run_id, fam_name, model, side,
                                           controlnet=req.controlnet is not None)
            where = f"run {run_id} samples {W0}x{H0} images here (width x height)"
        else:
            where = f"run {run_id} makes {side}x{side} images"

        # the init image, mask, outpainting canvas
        self.mode = "sample"
        self.image = self.mask = None
        self.inputs: dict[str, Any] = {}
        self.trivial: str | None = None
        self.strength: float | None = None
        if req.init_image is not None:
            im = _open_image(req.init_image, "init image")
            self.inputs["init_image"] = _file_id(req.init_image)
            w, h = im.size
            if req.outpaint is not None:
                left, top, right, bottom = req.outpaint
                W, H = w + left + right, h + top + bottom
                if (W, H) != (W0, H0):
                    raise EditInputError(f"outpaint: the init image {req.init_image} is {w}x{h}; with margins "
                                         f"left={left} top={top} right={right} bottom={bottom} the canvas is {W}x{H}, "
                                         f"but {where}" + ("" if req.height or req.width else
                                                           " (an any-size run extends to height=/width=)"))
                canvas = torch.zeros((1, 3, H0, W0))
                canvas[:, :, top:top + h, left:left + w] = _to_tensor(im)
                mask = torch.ones((1, 1, H0, W0))
                mask[:, :, top:top + h, left:left + w] = 0
                self.image, self.mask, self.mode = canvas, mask, "outpaint"
            else:
                if (w, h) != (W0, H0):
                    raise EditInputError(f"the init image {req.init_image} is {w}x{h}, but {where} "
                                         "(resize it, or outpaint with margins)")
                self.image = _to_tensor(im)
                self.mode = "invert" if req.invert else "sdedit"
                if req.mask is not None:
                    mi = _open_image(req.mask, "mask")
                    self.inputs["mask"] = _file_id(req.mask)
                    if mi.size != (w, h):
                        raise EditInputError(f"the mask {req.mask} is {mi.size[0]}x{mi.size[1]}, the init image "
                                             f"{req.init_image} is {w}x{h}")
                    self.mask = torch.from_numpy((np.asarray(mi.convert("L")) > 127).astype(np.float32))[None, None]
                    self.mode = "inpaint"
            if self.mask is not None:
                frac = float(self.mask.mean())
                if frac == 0.0:
                    self.trivial = "the mask is all zeros (black): nothing to generate, the init image is returned"
                elif frac == 1.0:
                    self.trivial = "the mask is all ones (white): everything is generated (SDEdit at this strength)"
                self.inputs["mask_generate_fraction"] = round(frac, 6)
            self.strength = (req.strength if req.strength is not None else
                             SDEDIT_STRENGTH if self.mode == "sdedit" else 1.0) if self.mode != "invert" else None
        # which family does the work, and can it
        fam_cls = get_family(base_family) if base_family else None
        if self.trained_inpainting:
            if self.mode not in ("sample", "inpaint", "outpaint") or req.control is not None:
                raise EditInputError(f"run {run_id} is a trained inpainting model: it takes init_image with mask or "
                                     "outpaint (or nothing); SDEdit and inversion need a DDPM / EDM / flow run")
            if req.strength not in (None, 1.0) or req.resample != 1:
                raise EditInputError(f"run {run_id} is a trained inpainting model: strength and resample apply to "
                                     "sampler-based inpainting of a DDPM / EDM / flow run")
        elif self.mode != "sample" and fam_cls is not None:
            editable, invertible = _edit_kind(fam_cls)
            if not editable:
                raise EditInputError(f"run {run_id} is a {base_family!r} run: editing needs a DDPM, EDM, consistency "
                                     "or flow family with intermediate noise levels")
            if self.mode == "invert" and not invertible:
                raise EditInputError(f"run {run_id} is a {base_family!r} run: inversion needs a deterministic "
                                     "DDIM / Euler sampler (DDPM, EDM, flow)")
        if self.mode == "invert" and req.sampler is not None:
            raise EditInputError("invert: the inversion edit uses the family's deterministic sampler (DDIM for DDPM, "
                                 "Euler for EDM and flow); leave sampler unset")
        if self.mode == "invert" and prep.cond_kind != "none":
            self.source = prep._condition(req.source_prompt, "source_prompt") if req.source_prompt is not None else None
        else:
            self.source = None

        # the control map
        self.control = None
        if req.control is not None:
            self.control = self._control(req, side, where)
            self.inputs["control"] = _file_id(req.control)

        # LoRA adapters and the embeddings
        self.loras: list[dict[str, Any]] = []
        self.lora_sources: list[Any] = []
        if req.loras:
            self._loras(req, prep, fam_name, model)
        self.embeddings: list[dict[str, Any]] = []
        self._embedding_set = None
        for spec in req.embedding or ():
            self.embeddings.append(self._embedding(spec, prep))
        if self.embeddings:
            self.inputs["embedding"] = [{k: v for k, v in e.items() if k not in ("path", "vector", "spec")}
                                        for e in self.embeddings]
            tokens = [e["token"] for e in self.embeddings]
            dup = sorted({t for t in tokens if tokens.count(t) > 1})
            if dup:
                raise EditInputError(f"embeddings {req.embedding}: the token {dup[0]!r} is defined more than once")

    # ------------------------------------------------------------------ checks


    @staticmethod
    def _check_base(cn: Any, prep: Any) -> None:
        base = Path(str(_state_config(cn.checkpoint).get("model", {}).get("base", "")))
        mine = Path(prep.run.checkpoint)
        if base.resolve() == mine.resolve():
            return
        sha = None
        if (base / "state.json").is_file():
            sha = json.loads((base / "state.json").read_text()).get("tensors_sha256")
        if sha is not None and sha == prep.identity["tensors_sha256"]:
            return
        raise EditInputError(f"ControlNet run {cn.id} was trained on the base checkpoint {base}, not on run "
                             f"{prep.run.id}'s checkpoint {mine} (another base run or another step); give its own "
                             f"base as run")

    def _control(self, req: Any, side: int, where: str) -> torch.Tensor:
        from models.controlnet import signal_channels

        signal = self.cn_model.get("signal", "canny")
        ch = signal_channels(signal)
        p = Path(req.control)
        if req.control_is_map and p.suffix == ".npy":
            if not p.is_file():
                raise EditInputError(f"control map {p} does not exist")
            a = np.load(p, allow_pickle=False)
            if a.ndim == 2:
                a = a[None]
            if a.ndim != 3 or a.shape[0] != ch or a.shape[1:] != (side, side):
                raise EditInputError(f"control map {p} has shape {a.shape}; this ControlNet ({signal}) takes "
                                     f"[{ch}, {side}, {side}] ({where})")
            a = a.astype(np.float32)
            if a.min() >= 0 and a.max() <= 1:
                a = a * 2 - 1  # {0, 1} maps -> the [-1, 1] the ControlNet trained on
            return torch.from_numpy(a)[None]
        im = _open_image(req.control, "control image")
        if im.size != (side, side):
            raise EditInputError(f"the control image {p} is {im.size[0]}x{im.size[1]}, but {where}")
        if not req.control_is_map:
            return _to_tensor(im)  # the ControlNet computes its map from it once loaded
        if ch != 1:
            raise EditInputError(f"control map {p}: this ControlNet's {signal} maps have {ch} channels; give them "
                                 f"as a .npy array [{ch}, {side}, {side}] (an image holds one channel)")
        return torch.from_numpy(np.where(np.asarray(im.convert("L")) > 127, 1.0, -1.0).astype(np.float32))[None, None]

    def _loras(self, req: Any, prep: Any, fam_name: str, model: dict[str, Any]) -> None:
        """Each ``PATH[:SCALE]``: a peft adapter folder, or ``run:<id>`` of a personalize LoRA run of
        this run; read, and checked against the net's weight shapes (from the checkpoint header)."""
        from models.lora import LoraError, LoraSource, check_lora_fits

        if fam_name == "personalize":
            raise EditInputError(f"run {prep.run.id} is a personalize run: give its base as run and this run as "
                                 f"lora=run:{prep.run.id} (or embedding=run:{prep.run.id} for textual inversion), "
                                 "with any other adapters")
        target = Path(model["base"]) if fam_name == "controlnet" else Path(prep.run.checkpoint)
        from models.checkpoint import read_state

        base_pipeline = (read_state(target).get("family_info") or {}).get("pipeline")
        if base_pipeline:  # an adapter-only checkpoint (diffusers_lora, lcm_lora): its header holds no net weights
            raise EditInputError(f"LoRA: run {prep.run.id} is a {fam_name!r} run, a LoRA adapter over the diffusers "
                                 f"pipeline {base_pipeline} (its checkpoint holds the adapter alone, not the net's "
                                 f"weights, so adapters are not merged into it here); sample model={base_pipeline} "
                                 "with loras=[the run's adapter (models.diffusers_lora.export_adapter), the others "
                                 "(diffusers safetensors)]")
        shapes = _net_weight_shapes(target)
        if not shapes:
            raise EditInputError(f"LoRA: run {prep.run.id} is a {fam_name!r} run without a denoiser net to adapt")
        for spec in req.loras:
            path, scale = parse_lora(spec)
            if not -10.0 <= scale <= 10.0:
                raise EditInputError(f"LoRA {spec!r}: scale {scale} is outside [-10, 10]")
            if str(path).startswith("run:"):
                src, rec = self._personalize_lora(str(path)[4:], prep, target)
            else:
                if path.is_file():
                    raise EditInputError(f"LoRA {path}: a single-file adapter (diffusers / kohya safetensors) applies "
                                         "to diffusers models; a run of this project takes a peft adapter folder "
                                         f"({LORA_CONFIG} + {LORA_WEIGHTS}) written by models/lora.save_lora, or "
                                         "run:<id> of a personalize LoRA run")
                if not path.is_dir():
                    raise EditInputError(f"LoRA adapter {path} does not exist")
                if not (path / LORA_CONFIG).is_file() or not (path / LORA_WEIGHTS).is_file():
                    raise EditInputError(f"LoRA adapter {path} is not a peft adapter folder (needs {LORA_CONFIG} and "
                                         f"{LORA_WEIGHTS})")
                try:
                    src = LoraSource.from_folder(path)
                except (LoraError, ValueError, KeyError) as exc:
                    raise EditInputError(f"LoRA adapter {path}: {exc}") from None
                rec = {"path": str(path.resolve()), "sha256": file_sha256(path / LORA_WEIGHTS)}
            try:
                check_lora_fits(src, shapes, f"run {prep.run.id}'s net")
            except LoraError as exc:
                raise EditInputError(str(exc)) from None
            self.loras.append({"spec": spec, "scale": scale, **rec})
            self.lora_sources.append(src)

    def _personalize(self, run_id: str, prep: Any, method: str, what: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """A finished personalize run of ``method`` named by ``what=run:<id>``: (run, its model config,
        the record of its checkpoint)."""
        from imagegen.train.runs import get_run
        from models.checkpoint import verify_checkpoint

        try:
            ref = get_run(prep.root, run_id)
        except (LookupError, ValueError) as exc:
            raise EditInputError(f"{what}=run:{run_id}: {exc}") from None
        if ref.checkpoint is None:
            raise EditInputError(f"{what}=run:{run_id}: run {ref.id} has no checkpoint yet")
        meta = verify_checkpoint(Path(ref.checkpoint))
        cfg = meta.get("config", {})
        fam, m = cfg.get("family"), cfg.get("model", {})
        if fam != "personalize" or m.get("method") != method:
            kind = f"a personalize {m.get('method')!r} run" if fam == "personalize" else f"a {fam!r} run"
            hint = {"dreambooth": f"(its whole net trained: sample it as run={ref.id})",
                    "lora": f"(give it as lora=run:{ref.id})",
                    "textual_inversion": f"(give it as embedding=run:{ref.id})"}.get(m.get("method"), "")
            raise EditInputError(f"{what}=run:{run_id}: run {ref.id} is {kind}, not a personalize {method!r} run "
                                 f"{hint}".rstrip())
        rec = {"run": ref.id, "checkpoint_step": int(meta["step"]), "sha256": meta["tensors_sha256"]}
        return ref, m, rec

    def _personalize_lora(self, run_id: str, prep: Any, target: Path) -> tuple[Any, dict[str, Any]]:
        from models.checkpoint import read_checkpoint
        from models.lora import LoraSource

        ref, m, rec = self._personalize(run_id, prep, "lora", "lora")
        base = Path(str(m.get("base", "")))
        if not _same_checkpoint(base, target):
            raise EditInputError(f"lora=run:{run_id}: personalize run {ref.id} adapted the base checkpoint {base}, not "
                                 f"run {prep.run.id}'s {target} (another base run or another step); sample it over "
                                 "its own base")
        tensors, meta = read_checkpoint(Path(ref.checkpoint))
        rank = int(m.get("lora_rank", 4))
        state = _ema_state(tensors, meta)
        src = LoraSource.from_state(state, "inner.net.", rank, float(m.get("lora_alpha") or rank),
                                    m.get("lora_targets", "default"), f"run:{ref.id}")
        return src, rec

    def _embedding(self, spec_text: str, prep: Any) -> dict[str, Any]:
        from models.personalize import embedding_file, read_embedding

        if prep.cond_kind != "text":
            raise EditInputError(f"embedding {spec_text}: a textual-inversion embedding needs a text-conditioned run; "
                                 f"run {prep.run.id} is {prep.cond_kind}-conditioned")
        # the checkpoint's own config names the resolved encoder (the run card may hold an alias such as 'world')
        spec = str(_state_config(prep.run.checkpoint).get("model", {}).get("text_encoder"))
        if spec_text.startswith("run:"):
            from models.checkpoint import read_checkpoint

            ref, m, rec = self._personalize(spec_text[4:], prep, "textual_inversion", "embedding")
            tensors, meta = read_checkpoint(Path(ref.checkpoint))
            vec = _ema_state(tensors, meta).get("ti.embedding")
            if vec is None:
                raise EditInputError(f"embedding {spec_text}: run {ref.id}'s checkpoint holds no ti.embedding")
            theirs = m.get("text_encoder")
            token = str(m.get("placeholder", "sks"))
        else:
            p = embedding_file(spec_text, EditInputError)
            token, vec, meta = read_embedding(p, EditInputError)
            theirs = meta.get("text_encoder")
            rec = {**_file_id(str(p)), "path": str(p.resolve())}
        if theirs is not None and theirs != spec:
            raise EditInputError(f"embedding {spec_text} was learned for the text encoder {theirs!r}; run {prep.run.id} "
                                 f"uses {spec!r}")
        return {**rec, "token": token, "spec": spec, "vector": vec.reshape(-1)}

    # ------------------------------------------------------------------ records

    def record(self) -> dict[str, Any]:
        """What the PNG parameters chunk says about editing and control."""
        req = self.req
        edit = None
        if self.mode != "sample":
            edit = {**_edit_inputs(self),
                    "outpaint": list(req.outpaint) if req.outpaint is not None else None,
                    "resample": req.resample if self.mask is not None else None,
                    "source_prompt": req.source_prompt if self.mode == "invert" else None,
                    "trained_inpainting": self.trained_inpainting, "trivial": self.trivial}
        control = None
        if self.control is not None:
            control = {"image": self.inputs["control"], "is_map": req.control_is_map,
                       "scale": req.control_scale if req.control_scale is not None
                       else float(self.cn_model.get("control_scale", 1.0)),
                       "signal": self.cn_model.get("signal", "canny")}
            if self.controlnet_run is not None:
                control["controlnet"] = self.cn_identity
        return {"edit": edit, "control": control, "embedding": self.inputs.get("embedding")}

    # ------------------------------------------------------------------ the model

    def load(self, prep: Any, device: str) -> Any:
        """The family to sample, with the ControlNet, LoRA and control map in place."""
        from models.checkpoint import load_family, read_state

        if self.controlnet_run is not None:
            ck = self.controlnet_run.checkpoint
            fam = load_family(ck, device=device)
            meta = read_state(ck)  # load_family just checked its tensors
            self.cn_identity = {"run": self.controlnet_run.id, "checkpoint_step": int(meta["step"]),
                                "tensors_sha256": meta["tensors_sha256"]}
        else:
            fam = load_family(prep.run.checkpoint, device=device)
        if self.lora_sources:
            from models.lora import apply_loras

            target = fam.base if hasattr(fam, "controlled") else fam
            apply_loras(target, [(src, lo["scale"]) for src, lo in zip(self.lora_sources, self.loras)])
            target.to(device).eval().requires_grad_(False)
        if self.control is not None:
            c = self.control.to(fam.device)
            self.control_map = c if self.req.control_is_map else fam.control_map(c)
        return fam

    def text_family(self, fam: Any) -> Any:
        """The family that encodes the captions (a ControlNet's base, an inpainting model's inner)."""
        if hasattr(fam, "controlled"):
            return fam.base
        return getattr(fam, "inner", fam)

    def context(self, fam: Any) -> ExitStack:
        stack = ExitStack()
        if self.embeddings:
            from models.personalize import EmbeddingSet

            if self._embedding_set is None:
                self._embedding_set = EmbeddingSet(self.embeddings[0]["spec"], [
                    (e["token"], e["vector"], e.get("file") or f"run:{e.get('run')}") for e in self.embeddings],
                    device=fam.device)
            stack.enter_context(self._embedding_set.active(self.text_family(fam)))
        return stack

    # ------------------------------------------------------------------ one batch

    def generate(self, fam: Any, n: int, cond: Any, negative: Any, sampler: str, steps: int, guidance: float,
                 x_T: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """n images in [-1, 1] for one batch, and the network evaluations it took."""
        ctl: dict[str, Any] = {}
        if self.control is not None:
            ctl = {"control": self.control_map, "control_scale": self.req.control_scale}
        if self.mode == "sample":
            size = {"height": self.latent_size[0], "width": self.latent_size[1]} if self.latent_size else {}
            res = fam.sample_result(n, conditioning=cond, sampler=sampler, steps=steps, guidance=guidance,
                                    negative=negative, x_T=x_T, generator=generator, **ctl, **size)
            return res.sample, int(res.nfe)
        dev = fam.device
        images = self.image.to(dev).expand(n, -1, -1, -1)
        calls = [0]
        hook = fam.net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            if self.trained_inpainting:
                res = fam.sample_result(n, conditioning=cond, sampler=sampler, steps=steps, guidance=guidance,
                                        negative=negative, x_T=x_T, generator=generator, image=images,
                                        mask=self.mask.to(dev))
                return res.sample, int(res.nfe)
            common = {"sampler": sampler, "steps": steps, "guidance": guidance, "negative": negative,
                      "generator": generator, "noise": x_T, **ctl}
            inner, active = fam, nullcontext()
            if getattr(fam, "name", None) == "personalize":  # the tuned base family, under its embedding
                inner, active = fam.inner, fam._active()
            with active:
                out = self._edit(inner, images, n, cond, common, ctl, steps, guidance, negative, dev)
        finally:
            hook.remove()
        return out, calls[0]

    def _edit(self, fam: Any, images: torch.Tensor, n: int, cond: Any, common: dict[str, Any], ctl: dict[str, Any],
              steps: int, guidance: float, negative: Any, dev: Any) -> torch.Tensor:
        """SDEdit, inpainting / outpainting or the inversion edit of one batch on ``fam``."""
        from models import editing

        if self.mode == "sdedit":
            return editing.sdedit(fam, images, self.strength, cond, **common)
        if self.mode in ("inpaint", "outpaint"):
            return editing.inpaint(fam, images, self.mask.to(dev), cond, strength=self.strength,
                                   resample=self.req.resample, **common).sample
        src = self.source
        if src is not None:
            src = [src] * n if isinstance(src, str) else torch.tensor([src] * n)
        return editing.invert_edit(fam, images, src, cond, steps=steps, guidance=guidance, negative=negative,
                                   control=ctl.get("control"), control_scale=ctl.get("control_scale"))


class PlainPlan:
    """No editing or control: the plan of a model that takes none (e.g. a diffusers pipeline, whose
    loader applies its own LoRAs); ``generate`` is the model's plain ``sample_result``."""

    mode, trivial, control = "sample", None, None

    def __init__(self, loras: list[str] | None = None) -> None:
        self.inputs: dict[str, Any] = {}
        self.loras = [{"spec": s} for s in loras or []]

    def record(self) -> dict[str, Any]:
        return {"edit": None, "control": None, "embedding": None}

    def context(self, fam: Any) -> ExitStack:
        return ExitStack()

    def generate(self, fam: Any, n: int, cond: Any, negative: Any, sampler: str, steps: int, guidance: float,
                 x_T: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        res = fam.sample_result(n, conditioning=cond, sampler=sampler, steps=steps, guidance=guidance,
                                negative=negative, x_T=x_T, generator=generator)
        return res.sample, int(res.nfe)


class DiffusersEditPlan:
    """Editing and control of a diffusers pipeline (models/diffusers_edit.py): ``init_image``
    [+ ``strength``] (img2img), + ``mask`` (inpainting), ``control`` + ``controlnet`` (a diffusers
    ControlNetModel folder) with ``control_scale``; inputs read and checked before any work."""

    trivial = None

    def __init__(self, req: Any) -> None:
        from models.diffusers_edit import check_controlnet_folder
        from models.hf_diffusers import image_size, resolve_spec

        self.req = req
        path, _ = resolve_spec(str(req.model))
        H, W = image_size(path, req.resolution, req.height, req.width)
        given = req.resolution or req.height or req.width
        where = f"{req.model} makes {W}x{H} images" + ("" if given else " (set resolution= or height=/width= for another size)")
        self.inputs: dict[str, Any] = {}
        self.loras = [{"spec": s} for s in req.loras]
        self.image = self.mask = self.control = None
        self.mode, self.strength = "sample", None
        if req.init_image is not None:
            self.image = _open_image(req.init_image, "init image").convert("RGB")
            self.inputs["init_image"] = _file_id(req.init_image)
            w, h = self.image.size
            if req.outpaint is not None:
                from models.diffusers_edit import outpaint_canvas

                left, top, right, bottom = req.outpaint
                cw, ch = w + left + right, h + top + bottom
                if (cw, ch) != (W, H):
                    raise EditInputError(f"outpaint: the init image {req.init_image} is {w}x{h}; with margins "
                                         f"left={left} top={top} right={right} bottom={bottom} the canvas is {cw}x{ch}, "
                                         f"but {where}")
                self.image, self.mask = outpaint_canvas(self.image, list(req.outpaint))
            elif self.image.size != (W, H):
                raise EditInputError(f"the init image {req.init_image} is {w}x{h}, but {where}")
            self.mode = "outpaint" if req.outpaint is not None else "invert" if req.invert else "sdedit"
            if req.mask is not None:
                mi = _open_image(req.mask, "mask")
                if mi.size != self.image.size:
                    raise EditInputError(f"the mask {req.mask} is {mi.size[0]}x{mi.size[1]}, the init image "
                                         f"{req.init_image} is {W}x{H}")
                self.mask = Image.fromarray(np.where(np.asarray(mi.convert("L")) > 127, 255, 0).astype(np.uint8))
                self.inputs["mask"] = _file_id(req.mask)
                self.mode = "inpaint"
            if self.mask is not None:
                frac = float((np.asarray(self.mask) > 0).mean())
                self.inputs["mask_generate_fraction"] = round(frac, 6)
            self.strength = None if self.mode == "invert" else req.strength if req.strength is not None else (
                SDEDIT_STRENGTH if self.mode == "sdedit" else 1.0)
        self.cn_path = None
        if req.control is not None:
            if req.controlnet is None:
                raise EditInputError(f"control= for {req.model} needs controlnet= (a diffusers ControlNetModel folder)")
            self.cn_path = check_controlnet_folder(req.controlnet)
            if req.control_is_map and Path(req.control).suffix == ".npy":
                raise EditInputError(f"control map {req.control}: a diffusers ControlNet takes its map as an image "
                                     "(PNG / JPEG, as its pipeline does), not a .npy array")
            self.control = _open_image(req.control, "control image").convert("RGB")
            if self.control.size != (W, H):
                raise EditInputError(f"the control image {req.control} is {self.control.size[0]}x{self.control.size[1]}, "
                                     f"but {where}")
            if not req.control_is_map:  # an image: its Canny edge map, as a canny ControlNet takes it
                from models.diffusers_edit import canny_control

                self.control = canny_control(self.control)
            self.inputs["control"] = _file_id(req.control)
            self.inputs["controlnet"] = {"folder": str(self.cn_path), "sha256": {
                str(f.relative_to(self.cn_path)): file_sha256(f) for f in sorted(self.cn_path.rglob("*.safetensors"))}}
        elif req.controlnet is not None:
            raise EditInputError(f"controlnet={req.controlnet!r} without control= (the control image) does nothing")
        self._pipe = None

    def record(self) -> dict[str, Any]:
        req = self.req
        edit = None
        if self.mode != "sample":
            edit = {**_edit_inputs(self), "pipeline": "diffusers",
                    "outpaint": list(req.outpaint) if req.outpaint is not None else None,
                    "source_prompt": req.source_prompt if self.mode == "invert" else None}
        control = None
        if self.control is not None:
            cn = self.inputs["controlnet"]
            control = {"image": self.inputs["control"], "is_map": req.control_is_map,
                       "signal": None if req.control_is_map else "canny",
                       "scale": req.control_scale if req.control_scale is not None else 1.0,
                       "controlnet": {"folder": cn["folder"], "sha256": stable_sha(cn["sha256"])}}
        return {"edit": edit, "control": control, "embedding": None}

    def context(self, fam: Any) -> ExitStack:
        return ExitStack()

    def pipeline(self, fam: Any) -> Any:
        """diffusers' pipeline for this edit on the loaded model ``fam`` (built once, its ControlNet loaded)."""
        from models import diffusers_edit as E

        if self._pipe is None:
            cn = E.load_controlnet(self.cn_path, fam) if self.cn_path is not None else None
            self._pipe = E.edit_pipeline(fam, self.mode, cn)
        return self._pipe

    def generate(self, fam: Any, n: int, cond: Any, negative: Any, sampler: str, steps: int, guidance: float,
                 x_T: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        from models import diffusers_edit as E

        if sampler != "pipeline":
            raise EditInputError(f"diffusers editing and control run the pipeline's own scheduler; sampler "
                                 f"{sampler!r} applies to plain sampling")
        return E.generate(fam, self.pipeline(fam), self.mode, list(cond), negative, steps, guidance, generator,
                          image=self.image, mask=self.mask, strength=self.strength, control=self.control,
                          control_scale=self.req.control_scale if self.req.control_scale is not None else 1.0,
                          latents=x_T, source=self.req.source_prompt)


def stable_sha(files: dict[str, str]) -> str:
    """One sha256 for a folder's file -> sha256 table."""
    import hashlib

    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
