"""``imagegen sample``: images from a trained run, each PNG carrying its full generation parameters.

``sample(request, root)`` loads a finished (or checkpointed) run's latest checkpoint (EMA
weights), generates ``n`` images per prompt and writes ``<out>/<prompt>-<k>.png`` plus
``grid.png`` and ``samples.jsonl``.  Every PNG has an iTXt chunk ``parameters`` holding JSON: the
model identity (run id, family, checkpoint step and tensors sha256, dataset), prompt, negative
prompt, seed, the image's own noise seed, sampler, steps, NFE, guidance, LoRAs, output size and
watermark, so an image alone says how to make it again.  Image k of prompt p starts from noise
seeded by ``(seed, p, k)``, so the same request gives the same images whatever the batch size.

Prompts are captions for text-conditioned runs and class names for class-conditioned ones; an
unconditional run takes no prompt.  ``watermark=TEXT`` embeds TEXT invisibly with the
``invisible-watermark`` package's ``dwtDct`` method (as Stable Diffusion's reference scripts do);
:func:`check_watermark` reads it back.  That method needs images of at least 256 x 256 pixels:
``output_size`` resizes the samples (bicubic) before saving, and the resize is recorded.

The model slot takes ``run=RUN``, ``model="run:RUN"`` or ``model="diffusers:PATH_OR_REPO_ID[@REVISION]"``:
any diffusers text-to-image pipeline (models/hf_diffusers.py: local folders and the user's Hugging
Face cache, safetensors only), sampled with its own scheduler (``sampler="pipeline"`` or
``"pipeline:<SchedulerClass>"``) or the project's samplers, at ``resolution``, with LoRA adapters
``loras=["PATH[:SCALE]"]``.

Editing and control (SDEdit, inpainting / outpainting, the inversion edit, ControlNet, LoRA
adapters, textual-inversion embeddings) are request fields too, for runs of this project;
imagegen/sample_edit.py checks their files before any work and makes each batch's call.

"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imagegen.artifacts import write_json_atomic
from imagegen.determinism import DEFAULT_THREADS, torch_threads
from imagegen.hashing import stable_hash

PARAMS_KEY = "parameters"
DEFAULT_WATERMARK = "imagegen"
WATERMARK_METHOD = "dwtDct"
WATERMARK_MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images
WATERMARK_MATCH = 0.9  # fraction of payload bits that must agree (chance: ~0.5)


class SampleError(ValueError):
    pass


def _unit_interval(schema: dict[str, Any]) -> None:
    """The form's bounds for strength (the number branch of its anyOf); the validator says why."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "number":
            branch.update(minimum=0.0, maximum=1.0)


class SampleRequest(BaseModel):
    """Parameters of ``imagegen sample`` and of the Prefect deployment ``sample``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str | None = Field(None, description="Training or distillation run id (or unique prefix)")
    model: str | None = Field(None, description="Or a model spec: 'run:RUN' or 'diffusers:PATH_OR_REPO_ID[@REVISION]'")
    prompts: list[str] = Field(default_factory=list, description="Captions (text models) or class names (class models)")
    prompts_file: str | None = Field(None, description="More prompts: one per line (or .jsonl with 'prompt')")
    negative: str | None = Field(None, description="Negative prompt / class replacing CFG's null branch")
    guidance: float = Field(1.0, ge=0.0, le=100.0, description="Classifier-free guidance scale (1 = none)")
    sampler: str | None = Field(None, description="Sampler (None = the family's default)")
    steps: int | None = Field(None, ge=1, le=10_000, description="Sampler steps (None = the family's default)")
    seed: int = Field(0, ge=0, le=2**62, description="Seeds every image's noise")
    n: int = Field(4, ge=1, le=1024, description="Images per prompt (unconditional runs: images in all)")
    loras: list[str] = Field(default_factory=list, description="LoRA adapters PATH[:SCALE], merged at their "
                             "scales: safetensors for diffusers models; for a run, peft adapter folders made by "
                             "models/lora.save_lora on its net or run:<id> of a personalize LoRA run of it")
    resolution: int | None = Field(None, ge=8, le=8192, description="diffusers models: image side (None = the "
                                   "pipeline's default)")
    height: int | None = Field(None, ge=8, le=8192, description="Runs of any-size families (DDPM, EDM, flow) and "
                               "diffusers models: the image height in pixels, e.g. an aspect bucket's (None = the "
                               "run's / pipeline's size); a multiple of the net's patch / downsampling (diffusers: "
                               "of the VAE factor)")
    width: int | None = Field(None, ge=8, le=8192, description="Runs of any-size families and diffusers models: the "
                              "image width in pixels (None = the run's / pipeline's size)")
    out: str | None = Field(None, description="Output folder (default <data root>/samples/<id>)")
    output_size: int | None = Field(None, ge=8, le=4096, description="Resize samples to this square side "
                                    "(bicubic) before saving; None keeps the model's size")
    watermark: str | None = Field(None, min_length=1, max_length=64,
                                  description="Embed this text as an invisible dwtDct watermark (None: no watermark)")
    grid: bool = Field(True, description="Also write grid.png")
    batch_size: int = Field(16, ge=1, le=1024, description="Images per sampler call")
    threads: int = Field(DEFAULT_THREADS, ge=1, le=1024, description="torch intra-op CPU threads of sampling (CPU "
                         "float reductions split by it, so it is part of the sample id; never taken from the machine)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where sampling runs")
    # editing and control (imagegen/sample_edit.py)
    init_image: str | None = Field(None, description="Image to edit (the model's size): SDEdit, or with mask / "
                                   "outpaint inpainting, or with invert the inversion edit")
    strength: float | None = Field(None, json_schema_extra=_unit_interval,
                                   description="Edit strength in [0, 1]: 0 returns the init image, 1 is plain "
                                   "sampling (None: 0.8 for SDEdit, 1 for inpainting)")
    mask: str | None = Field(None, description="Inpainting mask image, the init image's size: white = generate, "
                             "black = keep")
    outpaint: list[int] | None = Field(None, min_length=4, max_length=4, description="Outpainting margins "
                                       "[left, top, right, bottom] in pixels: the init image plus them = the model's size")
    resample: int = Field(1, ge=1, le=50, description="Inpainting: RePaint resampling passes per step (1 = none)")
    invert: bool = Field(False, description="DDIM/Euler-inversion edit of init_image (under source_prompt) to the prompts")
    source_prompt: str | None = Field(None, description="Invert: the prompt / class the init image is inverted "
                                      "under (None: unconditional)")
    control: str | None = Field(None, description="Control image (the model's size); its map is computed by the "
                                "ControlNet's own signal (Canny, boxes, segmentation)")
    control_scale: float | None = Field(None, ge=0.0, le=10.0, description="Weight of the control residuals "
                                        "(None: the ControlNet's default)")
    control_is_map: bool = Field(False, description="control is the map itself (runs: a grayscale image for "
                                 "Canny, .npy [C, H, W] for any signal; diffusers: the image the ControlNet takes, "
                                 "edges, depth, pose...); otherwise control is an image and its Canny edges are used")
    controlnet: str | None = Field(None, description="A ControlNet run trained on run (or give the ControlNet run "
                                   "as run); for a diffusers model, a diffusers ControlNetModel folder")
    embedding: list[str] | None = Field(None, description="Textual-inversion embeddings, one new token each: "
                                        "learned_embeds.safetensors files, or run:<id> of a personalize "
                                        "textual-inversion run")

    @field_validator("embedding", mode="before")
    @classmethod
    def _embeddings(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]  # one embedding (the field took a single path before)
        return v or None

    @field_validator("strength")
    @classmethod
    def _strength(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"strength must lie in [0, 1] (0 = the init image, 1 = plain sampling), got {v}")
        return v

    @field_validator("outpaint")
    @classmethod
    def _margins(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(m < 0 for m in v):
            raise ValueError(f"outpaint margins [left, top, right, bottom] must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SampleRequest":
        if (self.run is None) == (self.model is None):
            raise ValueError("give exactly one of run (a run id) or model (a model spec such as 'run:RUN')")
        if self.model is not None:
            if self.model.startswith("diffusers:"):
                from models.hf_diffusers import parse_spec

                parse_spec(self.model)
            elif not self.model.startswith("run:") or len(self.model) <= 4:
                raise ValueError(f"unknown model spec {self.model!r}; use 'run:RUN_ID' or "
                                 "'diffusers:PATH_OR_REPO_ID[@REVISION]'")
        if (self.height is not None or self.width is not None) and self.resolution is not None:
            raise ValueError("give resolution= (a square side) or height=/width=, not both")
        if (self.height is not None or self.width is not None) and self.output_size is not None:
            raise ValueError("output_size resizes to a square; with height/width leave it unset")
        if not self.is_diffusers and self.resolution is not None:
            raise ValueError("resolution= applies to diffusers models; a run samples at its own size "
                             "(resize with output_size=)")
        edits = [f for f in ("init_image", "strength", "mask", "outpaint", "source_prompt", "control",
                             "control_scale", "controlnet", "embedding") if getattr(self, f) is not None]
        edits += [f for f in ("invert", "control_is_map") if getattr(self, f)] + (["resample"] if self.resample != 1 else [])
        unsupported = [f for f in edits if f not in ("init_image", "strength", "mask", "outpaint", "invert",
                                                     "source_prompt", "control", "control_scale", "controlnet",
                                                     "control_is_map", "embedding")]
        if self.is_diffusers and unsupported:
            raise ValueError(f"{', '.join(unsupported)}: not supported for diffusers models (they take init_image, "
                             "strength, mask, outpaint, invert, source_prompt, control, control_scale, controlnet, "
                             "control_is_map and embedding: diffusers' img2img, inpainting, DDIM-inversion, ControlNet "
                             "pipelines and textual inversion); they apply to runs of this project (run=RUN)")
        if self.is_diffusers and any(e.startswith("run:") for e in self.embedding or ()):
            raise ValueError("embedding=run:<id> names a personalize run of this project (its embedding is for the "
                             "run's own text encoder); a diffusers model takes learned_embeds.safetensors files")
        needs_image = [f for f in ("strength", "mask", "outpaint") if getattr(self, f) is not None]
        if self.invert:
            needs_image.append("invert")
        if needs_image and self.init_image is None:
            raise ValueError(f"{', '.join(needs_image)} need init_image (the image to edit)")
        if self.mask is not None and self.outpaint is not None:
            raise ValueError("give mask (inpainting) or outpaint (margins), not both")
        if self.invert and (self.mask is not None or self.outpaint is not None or self.strength is not None):
            raise ValueError("invert is the inversion edit of the whole image: it takes no mask, outpaint or strength")
        if self.source_prompt is not None and not self.invert:
            raise ValueError("source_prompt applies to invert")
        if self.resample != 1 and self.mask is None and self.outpaint is None:
            raise ValueError("resample applies to inpainting (mask or outpaint)")
        if self.control is None and (self.control_scale is not None or self.control_is_map):
            raise ValueError("control_scale / control_is_map need control (the control image)")
        return self

    @property
    def is_diffusers(self) -> bool:
        return self.model is not None and self.model.startswith("diffusers:")

    @property
    def run_id(self) -> str:
        return self.run if self.run is not None else str(self.model)[4:]


def read_prompts_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SampleError(f"prompts file {p} does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise SampleError(f"{p}, line {n}: not JSON ({exc})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise SampleError(f"{p}, line {n}: expected an object with a 'prompt' string")
            out.append(rec["prompt"])
        else:
            out.append(line.strip())
    if not out:
        raise SampleError(f"prompts file {p} has no prompt")
    return out


class Prepared:
    """A request resolved against the registry: run, checkpoint identity, prompts and their conditions."""

    def __init__(self, req: SampleRequest, root: Path) -> None:
        from models.checkpoint import read_state
        from imagegen.train.runs import get_run
        from imagegen.train.trainer import TrainConfig
        from models.registry import get_family

        self.req, self.root = req, root
        if req.is_diffusers:
            from imagegen.sample_edit import PlainPlan

            self._diffusers(req)
            if req.init_image is None and req.control is None:
                self.edit = PlainPlan(req.loras)  # the pipeline's loader applies its LoRAs and embeddings
            else:
                from imagegen.sample_edit import DiffusersEditPlan, EditInputError

                try:
                    self.edit = DiffusersEditPlan(req)  # diffusers' img2img / inpainting / ControlNet pipelines
                except (EditInputError, ValueError) as exc:
                    raise SampleError(str(exc)) from None
            if req.embedding:
                from imagegen.hashing import file_sha256

                self.edit.inputs["embedding"] = [file_sha256(_embedding_file(e)) for e in req.embedding]
            return
        self.run = get_run(root, req.run_id)
        if self.run.checkpoint is None:
            raise SampleError(f"run {self.run.id} has no checkpoint yet (status {self.run.card.get('status')!r})")
        meta = read_state(self.run.checkpoint)
        self.train_cfg = TrainConfig(**self.run.card["config"])
        self.family_name = self.train_cfg.family
        fam_cls = get_family(self.family_name)
        self.cond_kind = self.train_cfg.model.get("conditioning", "none")
        if req.sampler is not None and req.sampler not in fam_cls.samplers:
            raise SampleError(f"unknown sampler {req.sampler!r} for family {self.family_name!r}; it has "
                              f"{list(fam_cls.samplers)}")
        prompts = list(req.prompts) + (read_prompts_file(req.prompts_file) if req.prompts_file else [])
        if self.cond_kind == "none":
            if prompts or req.negative is not None:
                raise SampleError(f"run {self.run.id} is unconditional: it takes no prompt or negative")
            if req.guidance != 1.0:
                raise SampleError(f"guidance={req.guidance} needs a conditional model; run {self.run.id} is unconditional")
            prompts = [""]
        elif not prompts:
            what = "captions" if self.cond_kind == "text" else "class names"
            raise SampleError(f"run {self.run.id} is {self.cond_kind}-conditioned: give prompts ({what})")
        self.prompts = prompts
        self.conditions = [self._condition(p, "prompt") for p in prompts]
        self.negative = self._condition(req.negative, "negative") if req.negative is not None else None
        self.identity = {"run": self.run.id, "family": self.family_name, "checkpoint_step": int(meta["step"]),
                         "tensors_sha256": meta["tensors_sha256"], "dataset": self.run.card.get("dataset_id"),
                         "dataset_name": self.run.card.get("dataset_name")}
        from imagegen.sample_edit import EditInputError, EditPlan

        try:
            self.edit = EditPlan(req, self)  # editing / control inputs: read and checked before any work
        except EditInputError as exc:
            raise SampleError(str(exc)) from None

    def _diffusers(self, req: SampleRequest) -> None:
        from models.hf_diffusers import DiffusersError, DiffusersModel, image_size, lora_file, parse_lora, resolve_spec

        path, self.identity = resolve_spec(str(req.model))  # not a pipeline / pickled weights: refused here
        try:
            self.size = image_size(path, req.resolution, req.height, req.width)  # (h, w), checked before loading
        except DiffusersError as exc:
            raise SampleError(str(exc)) from None
        for text in req.loras:
            lora_file(parse_lora(text)[0])
        for e in req.embedding or ():
            f = _embedding_file(e)
            if not f.is_file() or f.suffix != ".safetensors":
                raise SampleError(f"embedding {f} " + ("is not a .safetensors file" if f.is_file() else "does not exist"))
        self.run, self.train_cfg, self.family_name, self.cond_kind = None, None, "diffusers", "text"
        s = req.sampler
        if s is not None and s not in DiffusersModel.samplers and not s.startswith("pipeline:"):
            raise SampleError(f"unknown sampler {s!r} for a diffusers model; it has {list(DiffusersModel.samplers)} "
                              "or 'pipeline:<diffusers scheduler class>'")
        prompts = list(req.prompts) + (read_prompts_file(req.prompts_file) if req.prompts_file else [])
        if not prompts:
            raise SampleError(f"{req.model} is a text-to-image pipeline: give prompts")
        self.prompts = prompts
        self.conditions = prompts
        self.negative = req.negative

    def load(self, device: str) -> Any:
        """The model to sample: a diffusers pipeline, or the run's family (EMA weights)."""
        if self.req.is_diffusers:
            from models.hf_diffusers import DiffusersModel

            return DiffusersModel(str(self.req.model), device=device, resolution=self.req.resolution,
                                  height=self.req.height, width=self.req.width, loras=self.req.loras,
                                  embeddings=self.req.embedding or ())
        from models.checkpoint import load_family

        return load_family(self.run.checkpoint, device=device)

    def _condition(self, prompt: str, what: str) -> Any:
        if self.cond_kind == "text":
            return prompt
        if self.cond_kind == "class":
            from imagegen.train.trainer import LabelError, Labeler

            lab = Labeler(self.train_cfg)
            if prompt in lab.index:
                return lab.index[prompt]
            if lab.pattern is not None:
                try:
                    return lab.label(prompt, None, what)
                except LabelError:
                    pass
            raise SampleError(f"{what} {prompt!r} names none of the {len(lab.names)} classes of run {self.run.id}: "
                              f"{list(lab.names)[:20]}")
        return None


def _embedding_file(path: str) -> Path:
    f = Path(path).expanduser()
    return f / "learned_embeds.safetensors" if f.is_dir() else f


def _device(req: SampleRequest) -> str:
    import torch

    if req.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if req.device == "cuda" and not torch.cuda.is_available():
        raise SampleError("device='cuda' but no CUDA device is available")
    return req.device


def image_seed(seed: int, prompt_index: int, k: int) -> int:
    from imagegen.loader import derive_seed

    return derive_seed("sample-image", seed, prompt_index, k) % 2**62


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n] or "sample"


# ------------------------------------------------------------------------------------------ watermark


def _bits(text: str) -> list[int]:
    return [int(b) for byte in text.encode("utf-8") for b in f"{byte:08b}"]


def apply_watermark(image: Image.Image, text: str = DEFAULT_WATERMARK) -> Image.Image:
    """``image`` with ``text`` embedded by imwatermark's dwtDct (RGB in, RGB out)."""
    from imwatermark import WatermarkEncoder

    w, h = image.size
    if w * h < WATERMARK_MIN_PIXELS:
        raise SampleError(f"a dwtDct watermark needs images of at least 256 x 256 pixels; these are {w} x {h} "
                          "(set output_size=256 or more)")
    enc = WatermarkEncoder()
    enc.set_watermark("bits", _bits(text))
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    out = enc.encode(bgr, WATERMARK_METHOD)
    return Image.fromarray(np.ascontiguousarray(out[:, :, ::-1]))


def check_watermark(path: str | Path, text: str = DEFAULT_WATERMARK) -> dict[str, Any]:
    """Whether the image at ``path`` carries ``text`` as a dwtDct watermark: the fraction of its
    payload bits read back, detected when at least 90% agree (an unmarked image agrees on ~50%)."""
    from imwatermark import WatermarkDecoder

    p = Path(path)
    if not p.is_file():
        raise SampleError(f"image {p} does not exist")
    image = Image.open(p).convert("RGB")
    w, h = image.size
    if w * h < WATERMARK_MIN_PIXELS:
        raise SampleError(f"{p} is {w} x {h}: a dwtDct watermark needs at least 256 x 256 pixels")
    want = _bits(text)
    dec = WatermarkDecoder("bits", len(want))
    got = dec.decode(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), WATERMARK_METHOD)
    match = float(np.mean([int(a) == int(b) for a, b in zip(got, want)]))
    recorded = None
    params = read_parameters(p)
    if params is not None:
        recorded = params.get("watermark")
    return {"file": str(p), "watermark": text, "method": WATERMARK_METHOD, "bits": len(want), "bit_match": match,
            "detected": match >= WATERMARK_MATCH, "recorded_in_png": recorded}


def read_parameters(path: str | Path) -> dict[str, Any] | None:
    """The generation parameters a PNG written by :func:`sample` carries (None if it has none)."""
    with Image.open(path) as im:
        text = getattr(im, "text", {}).get(PARAMS_KEY) if hasattr(im, "text") else None
    return json.loads(text) if text else None


# ------------------------------------------------------------------------------------------ sample


def sample(request: SampleRequest | dict[str, Any], root: Path | str,
           progress: Any = None) -> dict[str, Any]:
    """Generate the request's images into its output folder; returns a summary (paths, parameters).
    Everything runs on ``request.threads`` torch threads."""
    req = request if isinstance(request, SampleRequest) else SampleRequest(**request)
    with torch_threads(req.threads):
        return _sample(req, Path(root), progress)


def _sample(req: SampleRequest, root: Path, progress: Any) -> dict[str, Any]:
    import torch

    from imagegen import __version__
    from models.reflow import pair_noise
    prep = Prepared(req, root)
    if req.watermark is not None:
        try:
            import imwatermark  # noqa: F401  (installed? fail before generating)
        except ImportError as exc:
            raise SampleError(f"watermarks need the invisible-watermark package ({exc}); setup.sh installs it "
                              "(pip install --no-deps invisible-watermark: its opencv-python requirement would "
                              "replace opencv-python-headless)") from None

        hw = (req.output_size, req.output_size) if req.output_size is not None else None
        if hw is None and req.is_diffusers:
            hw = prep.size
        elif hw is None and prep.train_cfg.model.get("data", "pixels") == "pixels":
            side = int(prep.train_cfg.model.get("image_size", 0))
            hw = (req.height or side, req.width or side)
        # (a latent run's decoded size is known once the first image is decoded: apply_watermark checks it
        # before anything is saved)
        if hw is not None and hw[0] * hw[1] < WATERMARK_MIN_PIXELS:
            raise SampleError(f"a dwtDct watermark needs images of at least 256 x 256 pixels; {req.run or req.model} makes "
                              f"about {hw[1]} x {hw[0]} (set output_size=256 or more)")
    device = _device(req)
    note = progress or (lambda msg: None)
    # batch_size stays in: a stochastic sampler's generator is seeded per batch, so the batch
    # layout can change its images (the initial noise is per image either way)
    settings = req.model_dump(mode="json", exclude={"out", "device", "run", "model", "prompts_file", "prompts"})
    plan = prep.edit
    sample_id = stable_hash({"model": prep.identity, "prompts": prep.prompts, "settings": settings,
                             "inputs": plan.inputs, "loras": [lo.get("sha256") for lo in plan.loras]})
    out = Path(req.out) if req.out else root / "samples" / sample_id
    if req.is_diffusers:
        fam = prep.load(device)
        prep.identity = fam.identity  # with the LoRAs' hashes
    else:  # (its tensors checked against the sha256 the id took from state.json: a corrupt file stops here)
        fam = plan.load(prep, device)  # the run's family (or its ControlNet), LoRA merged, control map made
    out.mkdir(parents=True, exist_ok=True)
    if plan.trivial:
        note(f"[sample] {plan.trivial}")
    sampler = req.sampler or fam.default_sampler
    if plan.mode == "invert" and not req.is_diffusers:
        sampler = "ddim" if "ddim" in fam.samplers else "euler"
    request_record = req.model_dump(mode="json", exclude={"out"})
    edit_record = plan.record()
    if req.is_diffusers and getattr(fam, "embeddings", None):
        edit_record["embedding"] = [{k: v for k, v in e.items() if k != "file"} | {"file": Path(e["file"]).name}
                                    for e in fam.embeddings]
    steps = int(req.steps or fam.default_steps)
    noise_shape = tuple(fam.noise_shape)
    if getattr(plan, "latent_size", None):  # an aspect-bucket size of an any-size family
        noise_shape = (noise_shape[0], *plan.latent_size)
    t0 = time.time()
    records: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for p, (prompt, cond) in enumerate(zip(prep.prompts, prep.conditions)):
        for start in range(0, req.n, req.batch_size):
            ks = list(range(start, min(req.n, start + req.batch_size)))
            seeds = [image_seed(req.seed, p, k) for k in ks]
            c = None
            if prep.cond_kind == "text":
                c = [cond] * len(ks)
            elif prep.cond_kind == "class":
                c = torch.tensor([cond] * len(ks))
            neg = None
            if prep.negative is not None:
                neg = [prep.negative] * len(ks) if prep.cond_kind == "text" else torch.tensor([prep.negative] * len(ks))
            with plan.context(fam):
                x, nfe = plan.generate(fam, len(ks), c, neg, sampler, steps,
                                       req.guidance if c is not None else 1.0,
                                       pair_noise(seeds, noise_shape).to(device),
                                       torch.Generator(device=device).manual_seed(seeds[0]))
            u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for j, k in enumerate(ks):
                im = Image.fromarray(u8[j])
                model_size = im.size
                if req.output_size is not None and im.size != (req.output_size, req.output_size):
                    im = im.resize((req.output_size, req.output_size), Image.Resampling.BICUBIC)
                if req.watermark is not None:
                    im = apply_watermark(im, req.watermark)
                name = f"{p:03d}-{_slug(prompt) if prompt else 'uncond'}-{k:03d}.png"
                params = {"model": prep.identity, "prompt": prompt if prep.cond_kind != "none" else None,
                          "negative": req.negative, "seed": req.seed, "image_seed": seeds[j], "prompt_index": p,
                          "index": k, "sampler": sampler, "steps": steps, "nfe": nfe,
                          "guidance": req.guidance if c is not None else 1.0,
                          "loras": list(req.loras) if req.is_diffusers  # (their hashes: model.loras)
                          else [{k: v for k, v in lo.items() if k != "path"} for lo in plan.loras],
                          **edit_record, "request": request_record,
                          "model_size": list(model_size), "output_size": list(im.size),
                          "watermark": ({"text": req.watermark, "method": WATERMARK_METHOD}
                                        if req.watermark is not None else None),
                          "generator": f"imagegen {__version__} sample"}
                info = PngInfo()
                info.add_itxt(PARAMS_KEY, json.dumps(params, sort_keys=True))
                im.save(out / name, pnginfo=info)
                records.append({"file": name, **params})
                images.append(im)
        note(f"[sample] prompt {p + 1}/{len(prep.prompts)}: {req.n} image(s)")
    (out / "samples.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    grid_path = None
    if req.grid:
        grid_path = out / "grid.png"
        _grid(images, req.n).save(grid_path)
    summary = {"sample_id": sample_id, "out": str(out), "files": [str(out / r["file"]) for r in records],
               "grid": str(grid_path) if grid_path else None, "run_id": prep.run.id if prep.run else None,
               "model": req.model, "family": prep.family_name,
               "sampler": sampler, "steps": steps, "guidance": req.guidance, "prompts": prep.prompts,
               "n_images": len(records), "seconds": round(time.time() - t0, 3),
               "watermark": req.watermark, "edit": plan.mode, "trivial": plan.trivial}
    write_json_atomic(out / "sample.json", {**summary, "request": req.model_dump(mode="json")})
    return summary


def _grid(images: list[Image.Image], cols: int) -> Image.Image:
    cols = max(1, min(cols, 8, len(images)))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


# ------------------------------------------------------------------------------------------ command line


def add_sample_parser(sub: Any) -> None:
    sp = sub.add_parser("sample", help="generate images from a run (PNG + grid, parameters in every PNG), or "
                        "check a PNG for the invisible watermark")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a training or distillation run id (or unique prefix)")
    src.add_argument("--model", help="a model spec: run:RUN or diffusers:PATH_OR_REPO_ID[@REVISION]")
    src.add_argument("--check-watermark", metavar="FILE", help="report whether FILE carries the watermark")
    sp.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                    help="a prompt (repeatable)")
    sp.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="a file of prompts, one per line (or .jsonl 'prompt')")
    sp.add_argument("--negative", help="negative prompt")
    sp.add_argument("--guidance", type=float, help="CFG scale (default 1: none)")
    sp.add_argument("--sampler", help="sampler (default: the family's)")
    sp.add_argument("--steps", type=int, help="sampler steps (default: the family's)")
    sp.add_argument("--seed", type=int, help="seed (default 0)")
    sp.add_argument("--n", type=int, help="images per prompt (default 4)")
    sp.add_argument("--lora", dest="loras", action="append", default=[], metavar="PATH[:SCALE]",
                    help="LoRA adapter (repeatable; merged at their scales): safetensors for diffusers models; "
                    "for a run, a peft adapter folder made by models/lora.save_lora on its net, or run:<id> of a "
                    "personalize LoRA run of it")
    sp.add_argument("--resolution", type=int, help="diffusers models: image side (default: the pipeline's)")
    sp.add_argument("--height", type=int, help="any-size runs (DDPM, EDM, flow) and diffusers models: image height "
                    "in pixels, e.g. an aspect bucket's (default: the run's / pipeline's size)")
    sp.add_argument("--width", type=int, help="any-size runs and diffusers models: image width in pixels (default: "
                    "the run's / pipeline's size)")
    sp.add_argument("--out", help="output folder (default <data root>/samples/<id>)")
    sp.add_argument("--output-size", type=int, help="resize samples to this side before saving")
    sp.add_argument("--watermark", nargs="?", const=DEFAULT_WATERMARK, default=None, metavar="TEXT",
                    help=f"embed an invisible dwtDct watermark (default text {DEFAULT_WATERMARK!r}); "
                    "with --check-watermark: the text to look for")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to sample (default auto)")
    sp.add_argument("--data-root", default=None, help="data root (default $IMAGEGEN_DATA_ROOT or ./imagegen-data)")
    sp.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")
    sp.add_argument("--no-prefect", action="store_true", help="run the plain function without Prefect")
    ed = sp.add_argument_group("editing and control")
    ed.add_argument("--init-image", metavar="FILE", help="image to edit (SDEdit; with --mask/--outpaint inpainting; "
                    "with --invert the inversion edit)")
    ed.add_argument("--strength", type=float, help="edit strength in [0, 1] (default 0.8 SDEdit, 1 inpainting)")
    ed.add_argument("--mask", metavar="FILE", help="inpainting mask, the init image's size: white = generate")
    ed.add_argument("--outpaint", metavar="L,T,R,B", type=_margins,
                    help="outpainting margins in pixels around --init-image (image + margins = the model's size)")
    ed.add_argument("--resample", type=int, help="inpainting: RePaint resampling passes per step (default 1)")
    ed.add_argument("--invert", action="store_true", help="DDIM/Euler-inversion edit of --init-image to --prompt")
    ed.add_argument("--source-prompt", metavar="TEXT", help="--invert: the prompt the init image is inverted under")
    ed.add_argument("--control", metavar="IMAGE", help="control image; the ControlNet computes its map from it")
    ed.add_argument("--control-scale", type=float, help="weight of the control (default: the ControlNet's)")
    ed.add_argument("--control-is-map", action="store_true",
                    help="--control is the map itself (runs: grayscale image for Canny, .npy [C, H, W] for any "
                    "signal; diffusers: the image its ControlNet takes, e.g. depth or pose); without it, Canny edges "
                    "of --control")
    ed.add_argument("--controlnet", metavar="RUN", help="a ControlNet run trained on --run")
    ed.add_argument("--embedding", action="append", metavar="FILE",
                    help="textual-inversion embedding (learned_embeds.safetensors, or run:<id> of a personalize "
                    "textual-inversion run; repeatable)")


def _margins(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"--outpaint takes four integers L,T,R,B, got {text!r}")
    return vals


_PATH_FIELDS = ("prompts_file", "out", "init_image", "mask", "control")


def request_from_args(args: argparse.Namespace) -> SampleRequest:
    data: dict[str, Any] = {}
    for field in ("run", "model", "prompts_file", "negative", "guidance", "sampler", "steps", "seed", "n", "out",
                  "output_size", "watermark", "device", "resolution", "height", "width", "init_image", "strength", "mask", "outpaint",
                  "resample", "source_prompt", "control", "control_scale", "controlnet"):
        v = getattr(args, field, None)
        if v is not None:
            data[field] = str(Path(v).resolve()) if field in _PATH_FIELDS else v
    for flag in ("invert", "control_is_map"):
        if getattr(args, flag, False):
            data[flag] = True
    data["prompts"] = list(args.prompts)
    from imagegen.sample_edit import parse_lora

    loras = []
    for spec in args.loras:
        path, scale = parse_lora(spec)
        where = str(path) if str(path).startswith("run:") else str(path.resolve())  # run:<id> is no path
        loras.append(f"{where}:{scale:g}" if spec != str(path) else where)
    data["loras"] = loras
    if getattr(args, "embedding", None):
        data["embedding"] = [e if e.startswith("run:") else str(Path(e).resolve()) for e in args.embedding]
    return SampleRequest(**data)


def cmd_sample(args: argparse.Namespace, via_prefect: Any = None) -> dict[str, Any]:
    """The command; ``via_prefect(request, root)`` runs the flow (given by the Prefect-facing cli)."""
    import sys

    from imagegen.paths import data_root

    if args.check_watermark:
        res = check_watermark(args.check_watermark, args.watermark or DEFAULT_WATERMARK)
        verdict = "carries" if res["detected"] else "does not carry"
        return {**res, "message": f"{res['file']} {verdict} the {res['method']} watermark {res['watermark']!r} "
                                  f"({res['bit_match']:.0%} of {res['bits']} bits match)"}
    req = request_from_args(args)
    root = data_root(args.data_root)
    Prepared(req, root)  # unknown run, class names, prompts file: refused before any work
    if args.no_prefect or via_prefect is None:
        res = sample(req, root, progress=lambda m: print(m, file=sys.stderr))
    else:
        res = via_prefect(req, root)
    return {**res, "message": f"{res['n_images']} image(s) in {res['out']}" + (f", grid {res['grid']}" if res["grid"] else "")}
