"""diffusers text-to-image pipelines as models: the spec ``diffusers:PATH_OR_REPO_ID[@REVISION]``.

``resolve_spec(spec)`` finds the pipeline folder (a local folder, or a repository in the user's
Hugging Face cache: offline, ``local_files_only``), checks it is a diffusers pipeline
(``model_index.json``) whose weights are all safetensors (pickled ``.bin``/``.ckpt``/``.pt`` are
refused: they would be unpickled), and records its identity (source, revision, pipeline class,
sha256 of every file loaded).  :class:`DiffusersModel` loads it and samples with the family
interface the project's runs have (``noise_shape``, ``sample_result``/``sample``,
``samplers``), so ``imagegen sample`` and ``imagegen evaluate`` treat it like a run:

* ``sampler="pipeline"`` (default) calls the pipeline itself with its own scheduler;
  ``"pipeline:EulerDiscreteScheduler"`` (any diffusers scheduler class) swaps the scheduler,
  built from the pipeline's scheduler config;
* ``edm_euler`` / ``edm_heun`` / ``dpmpp_2m`` are the project's stateless samplers on a Karras
  sigma grid spanning the model's own noise levels, through :func:`unet_denoiser`: the UNet in the
  D(x; sigma) convention (Karras et al. 2022), built on ``models.diffusion.ddpm_to_edm``: the input
  scaled by 1/sqrt(1 + sigma^2), the timestep interpolated in log-sigma from the scheduler's
  ``alphas_cumprod``, and the eps / v / x0 output turned into x0 (the idea of k-diffusion's
  ``external.py`` DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser; written here from those formulas);
  an SD3 flow transformer's velocity goes through ``models.diffusion.flow_to_edm`` the same way.
  Components a pipeline was saved without (``[null, null]`` in model_index.json, e.g. SD3's T5)
  are passed as None.

Images come back in [-1, 1] like every family's samples.  One network call on a CFG-doubled
batch counts as one NFE (the project's convention).  LoRA adapters (diffusers/peft format,
safetensors) are attached with ``load_lora_weights`` at a scale each.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from models.samplers import SampleResult

PREFIX = "diffusers:"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHTLESS = re.compile(r"(Tokenizer(Fast)?|Scheduler|ImageProcessor|FeatureExtractor|Processor)$")
PROJECT_SAMPLERS = ("edm_euler", "edm_heun", "dpmpp_2m")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_HASHES: dict[tuple[str, int, int], str] = {}


class DiffusersError(ValueError):
    """A diffusers model spec, folder or adapter that cannot be used (says what and where)."""


def is_diffusers_spec(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``diffusers:SOURCE[@REVISION]`` -> (SOURCE, REVISION or None)."""
    if not is_diffusers_spec(spec):
        raise DiffusersError(f"model spec {spec!r} is not a diffusers spec (diffusers:PATH_OR_REPO_ID[@REVISION])")
    body = spec[len(PREFIX):]
    source, rev = body, None
    if "@" in body and not Path(body).exists():
        source, rev = body.rsplit("@", 1)
        if not rev:
            raise DiffusersError(f"model spec {spec!r}: empty revision after '@'")
    if not source:
        raise DiffusersError(f"model spec {spec!r}: no path or repository id after 'diffusers:'")
    return source, rev


def _sha256(path: Path) -> str:
    from imagegen.hashing import file_sha256

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def check_weights_folder(folder: Path, what: str) -> list[Path]:
    """The safetensors files of one component folder; pickled-only weights refused by name."""
    safe = sorted(folder.rglob("*.safetensors"))
    if safe:
        return safe
    pickled = sorted(p for p in folder.rglob("*") if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise DiffusersError(f"{what}: only pickled weights ({', '.join(str(p) for p in pickled[:3])}); refused: "
                             "this project loads safetensors only (never unpickles a file it did not make); "
                             "convert them once where you trust them (load, then save_pretrained(..., "
                             "safe_serialization=True))")
    raise DiffusersError(f"{what}: no weights file (*.safetensors) in {folder}")


def check_pipeline_folder(path: Path) -> dict[str, Any]:
    """The model_index.json of a diffusers pipeline folder, every component's files checked."""
    index = path / "model_index.json"
    if not index.is_file():
        if (path / "config.json").is_file():
            raise DiffusersError(f"{path} holds a single model (config.json), not a diffusers pipeline "
                                 "(model_index.json); give the pipeline's folder")
        raise DiffusersError(f"{path} is not a diffusers pipeline: it has no model_index.json")
    try:
        mi = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DiffusersError(f"{index} is not valid JSON ({exc})") from None
    if not isinstance(mi, dict) or not isinstance(mi.get("_class_name"), str):
        raise DiffusersError(f"{index} names no pipeline class (_class_name)")
    for name, val in mi.items():
        if name.startswith("_") or not (isinstance(val, list) and len(val) == 2) or val[0] is None:
            continue
        folder = path / name
        if not folder.is_dir():
            raise DiffusersError(f"pipeline {path}: component {name!r} ({val[1]}) is missing (no folder {folder})")
        if not WEIGHTLESS.search(str(val[1])):
            check_weights_folder(folder, f"pipeline {path}, component {name!r} ({val[1]})")
    return mi


def resolve_spec(spec: str) -> tuple[Path, dict[str, Any]]:
    """(pipeline folder, identity) of a ``diffusers:`` spec, checked; nothing downloaded."""
    source, rev = parse_spec(spec)
    local = Path(source).expanduser()
    if local.exists():
        if rev is not None:
            raise DiffusersError(f"model spec {spec!r}: a revision (@{rev}) only applies to a Hub repository id, "
                                 f"and {local} is a local folder")
        path, revision = local.resolve(), None
    else:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):
            raise DiffusersError(f"model spec {spec!r}: {source!r} is neither an existing folder nor a Hugging Face "
                                 "repository id (owner/name)")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(source, revision=rev, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise DiffusersError(f"model spec {spec!r}: {source}{'@' + rev if rev else ''} is not in the Hugging Face "
                                 f"cache (HF_HOME / HF_HUB_CACHE) and nothing is downloaded here; place it first "
                                 f"(README: pre-placing real weights) ({type(exc).__name__})") from None
        revision = path.name  # the snapshot folder is the commit hash
    mi = check_pipeline_folder(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".safetensors", ".model"))
    identity = {"model": spec, "source": source, "revision": revision, "requested_revision": rev,
                "pipeline": mi["_class_name"], "diffusers_version": mi.get("_diffusers_version"),
                "files": {str(p.relative_to(path)): _sha256(p) for p in files}}
    return path, identity


def vae_factor(path: Path) -> int:
    """A pipeline folder's VAE downsampling factor (2^(len(block_out_channels) - 1), as diffusers'
    pipelines compute ``vae_scale_factor``), from its config: image sides must be multiples of it."""
    vae = path / "vae" / "config.json"
    return 2 ** (len(json.loads(vae.read_text()).get("block_out_channels", [0, 0, 0, 0])) - 1) if vae.is_file() else 8


def default_resolution(path: Path) -> int:
    """The image side a pipeline folder generates by default (net sample_size x VAE factor), from its configs."""
    cfg = {}
    for name in ("unet", "transformer"):
        f = path / name / "config.json"
        if f.is_file():
            cfg = json.loads(f.read_text())
            break
    size = cfg.get("sample_size", 64)
    return int(size[0] if isinstance(size, list) else size) * vae_factor(path)


def image_size(path: Path, resolution: int | None = None, height: int | None = None,
               width: int | None = None) -> tuple[int, int]:
    """(height, width) a pipeline folder generates: ``height``/``width`` where given, else
    ``resolution`` (a square side), else its default; each side a multiple of the VAE factor
    (refused otherwise, naming the side and the factor), read from the configs before any loading."""
    side = int(resolution or default_resolution(path))
    h, w = int(height or side), int(width or side)
    f = vae_factor(path)
    patch = transformer_patch(path)  # a DiT's latent patches (SD3's pipeline refuses other sides); a UNet: 1
    m = f * patch
    bad = [f"{name} {v}" for name, v in (("resolution", resolution), ("height", height), ("width", width))
           if v is not None and v % m]
    if bad:
        why = f"{path}'s VAE factor {f}" + (f" x its transformer's patch size {patch}" if patch > 1 else "")
        raise DiffusersError(f"{', '.join(bad)}: not a multiple of {m} ({why}; image sides must be multiples of {m})")
    return h, w


def transformer_patch(path: Path) -> int:
    """A transformer pipeline's latent patch size (SD3: 2) from its config; 1 for a UNet pipeline
    (its UNet pads uneven sides itself, so only the VAE factor binds)."""
    f = path / "transformer" / "config.json"
    return int(json.loads(f.read_text()).get("patch_size") or 1) if f.is_file() else 1


def parse_lora(text: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` -> (path, scale)."""
    path, scale = text, 1.0
    m = re.fullmatch(r"(.+):([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", text)
    if m and not Path(text).exists():
        path, scale = m.group(1), float(m.group(2))
    return Path(path).expanduser(), scale


def lora_file(path: Path) -> Path:
    """The adapter's safetensors file (a file, or a folder with one); pickled files refused."""
    if path.is_dir():
        files = check_weights_folder(path, f"LoRA adapter {path}")
        if len(files) != 1:
            raise DiffusersError(f"LoRA adapter folder {path} holds {len(files)} safetensors files; name one")
        return files[0]
    if not path.is_file():
        raise DiffusersError(f"LoRA adapter {path} does not exist")
    if path.suffix in PICKLED_SUFFIXES:
        raise DiffusersError(f"LoRA adapter {path} is a pickled file; refused: safetensors only")
    if path.suffix != ".safetensors":
        raise DiffusersError(f"LoRA adapter {path} is not a .safetensors file")
    return path


def unet_denoiser(unet: Any, alphas_cumprod: Tensor, prediction_type: str, context: Tensor,
                  uncond_context: Tensor | None = None, guidance: float = 1.0) -> Any:
    """D(x; sigma) -> x0 of a discrete-time eps/v/x0 UNet (UNet2DConditionModel call convention)
    under text embeddings ``context``; with guidance != 1, one doubled batch combined by CFG
    (x0 is linear in the net output, so guiding x0 equals guiding eps / v)."""
    from models.diffusion import ddpm_to_edm

    if prediction_type not in PREDICTIONS:
        raise DiffusersError(f"prediction_type {prediction_type!r} is not one of {list(PREDICTIONS)}")
    dtype = next(unet.parameters()).dtype

    def net(x_t: Tensor, t: Tensor) -> Tensor:
        if guidance == 1.0 or uncond_context is None:
            return unet(x_t.to(dtype), t.to(x_t.device, torch.float32), encoder_hidden_states=context).sample.float()
        both = torch.cat([uncond_context, context])
        out = unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]).to(x_t.device, torch.float32),
                   encoder_hidden_states=both).sample.float()
        u, c = out.chunk(2)
        return u + guidance * (c - u)

    return ddpm_to_edm(net, alphas_cumprod, pred=PREDICTIONS[prediction_type], quantize=False)  # type: ignore[arg-type]


class DiffusersModel:
    """A loaded diffusers pipeline with the sampling interface of the project's families."""

    name = "diffusers"
    samplers: tuple[str, ...] = ("pipeline", *PROJECT_SAMPLERS)
    default_sampler = "pipeline"
    default_steps = 25
    conditioning = "text"

    def __init__(self, spec: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 resolution: int | None = None, height: int | None = None, width: int | None = None,
                 loras: Sequence[str] = (), embeddings: Sequence[str] = ()) -> None:
        from diffusers import DiffusionPipeline

        self.spec = spec
        self.path, self.identity = resolve_spec(spec)
        self.device = torch.device(device)
        dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        mi = json.loads((self.path / "model_index.json").read_text())
        # components saved as absent ([null, null], e.g. SD3 without its T5) are passed as None
        absent = {k: None for k, v in mi.items() if not k.startswith("_") and v == [None, None]}
        try:
            pipe = DiffusionPipeline.from_pretrained(str(self.path), use_safetensors=True, local_files_only=True,
                                                     dtype=dtype, **absent)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise DiffusersError(f"model spec {spec!r}: diffusers cannot load {self.path} ({exc})") from None
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if self.net is None or getattr(pipe, "vae", None) is None or getattr(pipe, "text_encoder", None) is None:
            raise DiffusersError(f"model spec {spec!r}: {type(pipe).__name__} is not a latent text-to-image pipeline "
                                 "(needs unet/transformer, vae and text_encoder)")
        self.vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        size = getattr(self.net.config, "sample_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else int(size)
        default_res = size * self.vae_scale  # sample_size counts latent pixels (UNet and DiT alike)
        self.resolution = int(resolution or default_res)
        self.height, self.width = int(height or self.resolution), int(width or self.resolution)
        m = self.vae_scale * transformer_patch(self.path)
        bad = [f"{k} {v}" for k, v in (("resolution", self.resolution), ("height", self.height), ("width", self.width))
               if v % m]
        if bad:
            raise DiffusersError(f"{', '.join(bad)}: not a multiple of {m} (the VAE factor {self.vae_scale}"
                                 f"{' x the transformer patch size' if m != self.vae_scale else ''})")
        self.latent_channels = int(pipe.vae.config.latent_channels)
        self.loras: list[dict[str, Any]] = []
        for text in loras:
            self.add_lora(text)
        self.embeddings: list[dict[str, Any]] = []
        for path in embeddings:
            self.add_embedding(path)
        self._calls = 0
        self.net.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self._calls += 1

    # ------------------------------------------------------------------ LoRA

    def add_lora(self, text: str) -> None:
        from imagegen.hashing import file_sha256

        path, scale = parse_lora(text)
        f = lora_file(path)
        name = f"lora{len(self.loras)}"
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: as meant
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            msg = str(exc)
            if "size mismatch" in msg or "shape" in msg:
                first = re.search(r"size mismatch for ([^:]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) "
                                  r"from checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))", msg)
                what = (f"{first.group(1)} is {first.group(2)} in the adapter but {first.group(3)} in the model"
                        if first else msg[:300])
                n = msg.count("size mismatch")
                raise DiffusersError(f"LoRA adapter {f} does not fit {self.spec}: shape mismatch: {what}"
                                     f"{f' (and {n - 1} more)' if n > 1 else ''}; it was trained for another base "
                                     "model") from None
            raise DiffusersError(f"LoRA adapter {f} cannot be loaded into {self.spec} ({msg[:400]})") from None
        self.loras.append({"file": str(f), "scale": scale, "sha256": file_sha256(f), "adapter": name})
        self.pipe.set_adapters([d["adapter"] for d in self.loras], adapter_weights=[d["scale"] for d in self.loras])
        self.identity = {**self.identity, "loras": [{k: d[k] for k in ("file", "scale", "sha256")} for d in self.loras]}

    def add_embedding(self, path: str | Path) -> None:
        """A textual-inversion embedding (safetensors {token: vector}, as models/personalize.py and
        diffusers' own training script write it) for the pipeline's text encoder, through diffusers'
        ``load_textual_inversion``; the token must be new and the width the text encoder's."""
        from imagegen.hashing import file_sha256
        from models.personalize import embedding_file, read_embedding

        f = embedding_file(path, DiffusersError)
        if not hasattr(self.pipe, "load_textual_inversion"):
            raise DiffusersError(f"embedding {f}: {type(self.pipe).__name__} does not load textual-inversion embeddings")
        token, vec, meta = read_embedding(f, DiffusersError)
        width = int(self.pipe.text_encoder.get_input_embeddings().weight.shape[-1])
        if vec.ndim not in (1, 2) or vec.shape[-1] != width:
            raise DiffusersError(f"embedding {f}: its vector for {token!r} has shape {list(vec.shape)}; the text encoder "
                                 f"of {self.spec} takes width {width} (an embedding for another text encoder)")
        try:
            self.pipe.load_textual_inversion({token: vec.to(self.pipe.text_encoder.dtype)}, token=token)
        except ValueError as exc:
            raise DiffusersError(f"embedding {f} (token {token!r}) cannot be loaded into {self.spec}: {exc}") from None
        self.embeddings.append({"file": str(f.resolve()), "token": token, "sha256": file_sha256(f),
                                "text_encoder": meta.get("text_encoder")})
        self.identity = {**self.identity, "embeddings": [dict(e) for e in self.embeddings]}

    # ------------------------------------------------------------------ family interface

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.latent_channels, self.height // self.vae_scale, self.width // self.vae_scale)

    def _check(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        sampler = sampler or self.default_sampler
        ok = sampler in self.samplers or sampler.startswith("pipeline:")
        if not ok:
            raise DiffusersError(f"unknown sampler {sampler!r} for a diffusers model; use 'pipeline' (its own scheduler), "
                                 f"'pipeline:<diffusers scheduler class>', or one of {list(PROJECT_SAMPLERS)}")
        if sampler in PROJECT_SAMPLERS and not (self.is_discrete_unet or self.is_sd3_flow):
            raise DiffusersError(f"sampler {sampler!r} needs a discrete-time UNet pipeline (eps/v prediction) or an "
                                 f"SD3-style flow transformer; {type(self.pipe).__name__} samples with sampler='pipeline'")
        steps = int(steps or self.default_steps)
        return sampler, steps

    @property
    def is_discrete_unet(self) -> bool:
        return getattr(self.pipe, "unet", None) is not None and hasattr(self.pipe.scheduler, "alphas_cumprod")

    @property
    def is_sd3_flow(self) -> bool:
        return (getattr(self.pipe, "transformer", None) is not None and type(self.pipe).__name__.startswith("StableDiffusion3")
                and type(self.pipe.scheduler).__name__.startswith("FlowMatch"))

    def scheduler_for(self, sampler: str) -> Any:
        if not sampler.startswith("pipeline:"):
            return self.pipe.scheduler
        import diffusers

        cls_name = sampler.split(":", 1)[1]
        cls = getattr(diffusers, cls_name, None)
        if cls is None or not cls_name.endswith("Scheduler"):
            raise DiffusersError(f"sampler {sampler!r}: diffusers has no scheduler class {cls_name!r}")
        return cls.from_config(self.pipe.scheduler.config)

    def _prompts(self, conditioning: Any, n: int, what: str) -> list[str] | None:
        if conditioning is None:
            return None
        if isinstance(conditioning, str):
            return [conditioning] * n
        out = [str(c) for c in conditioning]
        if len(out) != n:
            raise DiffusersError(f"{what}: {len(out)} prompts for {n} images")
        return out

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        if options:
            raise DiffusersError(f"diffusers sampling takes no option(s) {sorted(options)}")
        sampler, steps = self._check(sampler, steps)
        prompts = self._prompts(conditioning, n, "conditioning") or [""] * n
        neg = self._prompts(negative, n, "negative")
        shape = (n, *self.noise_shape)
        if x_T is None:
            x_T = torch.randn(shape, generator=generator)
        if tuple(x_T.shape) != shape:
            raise DiffusersError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        self._calls = 0
        with torch.no_grad():
            if sampler in PROJECT_SAMPLERS:
                img = self._project_sample(prompts, neg, sampler, steps, float(guidance), x_T, generator)
            else:
                img = self._pipeline_sample(prompts, neg, sampler, steps, float(guidance), x_T, generator)
        return SampleResult(img.float().clamp(-1, 1).cpu(), self._calls)

    def sample(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
               guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
               x_T: Tensor | None = None, **options: Any) -> Tensor:
        return self.sample_result(n, conditioning, sampler, steps, guidance, negative, generator, x_T, **options).sample

    def _pipeline_sample(self, prompts: list[str], neg: list[str] | None, sampler: str, steps: int, guidance: float,
                         x_T: Tensor, generator: torch.Generator | None) -> Tensor:
        own = self.pipe.scheduler
        self.pipe.scheduler = self.scheduler_for(sampler)
        try:
            kw: dict[str, Any] = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance,
                                      height=self.height, width=self.width, output_type="pt",
                                      latents=x_T.to(self.device, self.net.dtype), generator=generator)
            if neg is not None:
                kw["negative_prompt"] = neg
            out = self.pipe(**kw).images
        finally:
            self.pipe.scheduler = own
        return out * 2 - 1

    def encode_prompts(self, prompts: list[str], neg: list[str] | None, guidance: float) -> tuple[Tensor, Tensor | None]:
        cfg = guidance != 1.0 or neg is not None
        pe, ne = self.pipe.encode_prompt(prompts, self.device, 1, cfg, negative_prompt=neg)
        return pe, (ne if cfg else None)

    def decode(self, z: Tensor) -> Tensor:
        vc = self.pipe.vae.config
        z = z / vc.scaling_factor + (getattr(vc, "shift_factor", None) or 0.0)
        return self.pipe.vae.decode(z.to(self.pipe.vae.dtype)).sample

    def sigma_range(self) -> tuple[float, float]:
        ab = self.pipe.scheduler.alphas_cumprod.to(torch.float64)
        sig = ((1 - ab) / ab).sqrt()
        return float(sig[0]), float(sig[-1])

    def denoiser(self, prompts: list[str], neg: list[str] | None, guidance: float) -> Any:
        pe, ne = self.encode_prompts(prompts, neg, guidance)
        sc = self.pipe.scheduler.config
        return unet_denoiser(self.pipe.unet, self.pipe.scheduler.alphas_cumprod, sc.prediction_type, pe, ne,
                             guidance if ne is not None else 1.0)

    def flow_denoiser(self, prompts: list[str], neg: list[str] | None, guidance: float) -> Any:
        """D(x; sigma) of an SD3 flow transformer: its velocity (eps - x0 on x_t = (1 - t) x0 + t eps, the
        project's flow convention) at t = sigma / (1 + sigma) through models.diffusion.flow_to_edm."""
        from models.diffusion import flow_to_edm

        cfg = guidance != 1.0 or neg is not None
        pe, ne, pp, npool = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                                                    do_classifier_free_guidance=cfg, negative_prompt=neg)
        tr = self.pipe.transformer
        dt = tr.dtype

        def velocity(x_t: Tensor, t: Tensor) -> Tensor:
            ts = (t.float() * 1000).to(x_t.device)
            if not cfg:
                return tr(hidden_states=x_t.to(dt), timestep=ts, encoder_hidden_states=pe,
                          pooled_projections=pp).sample.float()
            out = tr(hidden_states=torch.cat([x_t, x_t]).to(dt), timestep=torch.cat([ts, ts]),
                     encoder_hidden_states=torch.cat([ne, pe]), pooled_projections=torch.cat([npool, pp])).sample.float()
            u, c = out.chunk(2)
            return u + guidance * (c - u)

        return flow_to_edm(velocity)

    def _project_sample(self, prompts: list[str], neg: list[str] | None, sampler: str, steps: int, guidance: float,
                        x_T: Tensor, generator: torch.Generator | None) -> Tensor:
        from models import samplers as S
        from models.diffusion import karras_sigmas

        if self.is_sd3_flow:  # t in (0, 1): sigma = t / (1 - t), from t = 1 - 1e-3 (pure noise has no finite sigma)
            D = self.flow_denoiser(prompts, neg, guidance)
            smin, smax = 1e-3, (1 - 1e-3) / 1e-3
        else:
            D = self.denoiser(prompts, neg, guidance)
            smin, smax = self.sigma_range()
        sigmas = karras_sigmas(steps, smin, smax)
        x = x_T.to(self.device, torch.float32) * smax
        res = getattr(S, sampler)(D, x, sigmas)
        return self.decode(res.sample)


def load_diffusers_model(spec: str, **kw: Any) -> DiffusersModel:
    return DiffusersModel(spec, **kw)


# ------------------------------------------------------------------------------------------ pretrained VAE


class _VAEConfig:
    def __init__(self, image_size: int) -> None:
        self.image_size = image_size


class DiffusersVAE:
    """A diffusers ``AutoencoderKL`` with the project's autoencoder interface: ``encode(x) -> (mu,
    logvar)`` with the model's ``shift_factor`` already subtracted, ``decode(z)`` adding it back, so
    latents scaled by the model's ``scaling_factor`` (``latent_scale``) decode as
    ``decode(z / latent_scale)`` like the project's own autoencoders' (SD: 0.18215, no shift; SD3 /
    FLUX: scale and shift, 16 channels).

    ``source``: ``diffusers:PATH_OR_REPO_ID[@REVISION]`` naming a pipeline (its ``vae`` folder) or an
    AutoencoderKL folder, or a loaded ``AutoencoderKL``."""

    name = "diffusers_vae"

    def __init__(self, source: Any, *, device: str = "cpu", image_size: int | None = None) -> None:
        from diffusers import AutoencoderKL

        if isinstance(source, AutoencoderKL):
            self.vae, self.identity = source, {"model": "AutoencoderKL (in memory)",
                                               "tensors_sha256": _state_sha256(source)}
        else:
            self.vae, self.identity = _load_vae(str(source))
        self.vae.to(device).eval().requires_grad_(False)
        c = self.vae.config
        self.scaling_factor = float(c.scaling_factor)
        self.shift_factor = float(getattr(c, "shift_factor", None) or 0.0)
        self.latent_channels = int(c.latent_channels)
        self.factor = 2 ** (len(c.block_out_channels) - 1)
        self.cfg = _VAEConfig(int(image_size or c.sample_size))
        self.identity = {**self.identity, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float() - self.shift_factor, dist.logvar.float()

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode((z + self.shift_factor).to(self.device, self.vae.dtype)).sample.float()


def _state_sha256(module: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _load_vae(spec: str) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKL

    source, rev = parse_spec(spec)
    local = Path(source).expanduser()
    if local.is_dir() and not (local / "model_index.json").is_file():  # an AutoencoderKL folder of its own
        cfg = local / "config.json"
        if not cfg.is_file():
            raise DiffusersError(f"{local} is neither a diffusers pipeline (model_index.json) nor a model folder "
                                 "(config.json)")
        name = json.loads(cfg.read_text()).get("_class_name")
        if name != "AutoencoderKL":
            raise DiffusersError(f"{local} holds a {name}, not an AutoencoderKL")
        files = check_weights_folder(local, f"VAE {local}")
        folder, sub = local, None
        identity = {"model": spec, "files": {str(p.relative_to(local)): _sha256(p) for p in [cfg, *files]}}
    else:
        path, pid = resolve_spec(spec)
        if not (path / "vae").is_dir():
            raise DiffusersError(f"pipeline {path} has no vae component")
        folder, sub = path, "vae"
        identity = {**pid, "files": {k: v for k, v in pid["files"].items() if k.startswith("vae/")}}
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder=sub, use_safetensors=True, local_files_only=True)
    return vae, identity
