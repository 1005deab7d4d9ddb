"""LoRA fine-tuning of a diffusers text-to-image pipeline's UNet, as a family of the generic trainer.

``family="diffusers_lora"`` with ``model={"pipeline": "diffusers:PATH_OR_REPO_ID[@REVISION]",
"image_size": 512, "rank": 4, ...}`` loads the pipeline (models/hf_diffusers.py: safetensors only,
offline), freezes it, and injects peft LoRA layers (rank, alpha, target modules) into the UNet's
attention projections, and optionally the CLIP text encoder's (``text_encoder_lora``).  The trainer
then runs as for any family (EMA of the trainable weights only, resume, bf16 autocast,
safetensors checkpoints, torchrun): the only trainable parameters are the adapters.

Loss: the pipeline's own objective.  Images are encoded by the frozen VAE ((posterior mean -
``shift_factor``) * ``scaling_factor``), noised at a uniform training timestep with the scheduler's ``alphas_cumprod``,
and the UNet's eps / v output regressed on its target (``prediction_type``); captions go through
the frozen (or LoRA'd) text encoder, replaced by the empty prompt with probability
``cond_dropout`` (CFG).  DreamBooth prior preservation (``prior_prompt`` + ``prior_weight``):
each step also denoises images the frozen base generated once for the class prompt
(``prior_images`` of them, seeded), so the adapter keeps the class (Ruiz et al. 2023, eq. 2).

Sampling goes through ``DiffusersModel`` on the same modules (the pipeline's scheduler or the
project's samplers).  :func:`export_adapter` writes the adapter alone, EMA weights, in the
diffusers/peft LoRA format (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight``
...) that ``load_lora_weights`` and ``imagegen sample --lora`` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems
from models.base import Family, FamilyConfig, LossOut
from models.samplers import SampleResult

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_FILE = "pytorch_lora_weights.safetensors"


class DiffusersLoraConfig(FamilyConfig):
    builds_denoiser: ClassVar[bool] = False

    pipeline: str = Field(..., description="The base: diffusers:PATH_OR_REPO_ID[@REVISION]")
    conditioning: Any = Field("text", description="Always text (the pipeline's own text encoder)")
    text_encoder: str | None = Field("pipeline", description="Always the pipeline's text encoder")
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (scale alpha / r); None = rank")
    targets: tuple[str, ...] = Field(UNET_TARGETS, min_length=1, description="UNet module-name suffixes")
    text_encoder_lora: bool = Field(False, description="Also LoRA on the text encoder's attention projections")
    text_targets: tuple[str, ...] = Field(TEXT_TARGETS, min_length=1, description="Text-encoder module suffixes")
    prior_prompt: str | None = Field(None, description="DreamBooth prior preservation: the class prompt")
    prior_weight: float = Field(1.0, ge=0.0, description="Weight of the prior-preservation loss")
    prior_images: int = Field(8, ge=1, le=10_000, description="Class images the frozen base generates once")
    prior_steps: int = Field(25, ge=1, le=1000, description="Sampler steps for the class images")
    base_files: dict[str, str] | None = Field(None, description="The base's identity: sha256 of every file of the "
                                              "pipeline folder (the run layer fills it in, so the run id hashes it; "
                                              "checked whenever the family is built)")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        from models.hf_diffusers import parse_spec

        if p.can("pipeline"):
            try:
                parse_spec(self.pipeline)
            except ValueError as exc:
                p.add(str(exc))
        if p.can("conditioning", "text_encoder") and (self.conditioning != "text" or self.text_encoder != "pipeline"):
            p.add("conditioning is 'text' through the pipeline's text encoder "
                  "(leave conditioning and text_encoder unset)")
        if p.can("data", "channels") and (self.data != "pixels" or self.channels != 3):
            p.add("diffusers_lora trains on RGB images (data='pixels', channels=3); the VAE encodes them")


def base_digest(files: Mapping[str, str]) -> str:
    """One hash of a pipeline's identity (its files' sha256 by relative path)."""
    from imagegen.hashing import stable_hash

    return stable_hash(dict(sorted(files.items())))


def check_base(cfg: DiffusersLoraConfig, identity: Mapping[str, Any], recorded_in: str = "its config") -> None:
    """Refuse a base pipeline whose files are not the ones the config records (``base_files``):
    the folder behind the spec changed since the run was made (both identities named)."""
    if cfg.base_files is None:
        return
    now = dict(identity.get("files") or {})
    if now == cfg.base_files:
        return
    changed = sorted(k for k in set(now) | set(cfg.base_files) if now.get(k) != cfg.base_files.get(k))
    what = "; ".join(f"{k}: recorded {str(cfg.base_files.get(k, 'absent'))[:12]}, now {str(now.get(k, 'absent'))[:12]}"
                     for k in changed[:3])
    raise ValueError(f"{cfg.pipeline}: the base pipeline changed since this model was made: it was trained on files "
                     f"{base_digest(cfg.base_files)[:16]} (recorded in {recorded_in}), the folder now holds files "
                     f"{base_digest(now)[:16]}; {len(changed)} file(s) differ ({what}{'; ...' if len(changed) > 3 else ''}). "
                     "Restore that base, or train a new run on this one")


class DiffusersLora(Family):
    name = "diffusers_lora"
    Config = DiffusersLoraConfig
    samplers = ("pipeline", "edm_euler", "edm_heun", "dpmpp_2m")
    default_sampler = "pipeline"
    default_steps = 25
    conditioning = frozenset({"text"})

    def __init__(self, cfg: DiffusersLoraConfig | Mapping[str, Any]) -> None:
        nn.Module.__init__(self)  # not Family.__init__: the text tower is the pipeline's, not open_clip
        if isinstance(cfg, Mapping):
            cfg = self.Config(**cfg)
        self.cfg = cfg
        self.text_dim = 0
        from models.hf_diffusers import DiffusersModel

        model = DiffusersModel(cfg.pipeline, device="cpu", dtype=torch.float32, resolution=cfg.image_size)
        check_base(cfg, model.identity)
        pipe = model.pipe
        if getattr(pipe, "unet", None) is None or not hasattr(pipe.scheduler, "alphas_cumprod"):
            raise ValueError(f"diffusers_lora: {cfg.pipeline} is a {type(pipe).__name__}; LoRA training here needs a "
                             "UNet pipeline with a discrete-time scheduler (eps / v prediction)")
        from peft import LoraConfig

        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        alpha = cfg.alpha or cfg.rank
        pipe.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=alpha, target_modules=list(cfg.targets),
                                         init_lora_weights=True))
        if cfg.text_encoder_lora:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=alpha, target_modules=list(cfg.text_targets),
                                               init_lora_weights=True), pipe.text_encoder)
        self.net = pipe.unet
        self.text_model = pipe.text_encoder
        object.__setattr__(self, "model", model)  # not a submodule: the VAE stays out of checkpoints
        self.register_buffer("alphas_cumprod", pipe.scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.prediction_type = pipe.scheduler.config.prediction_type
        self._prior: list[Tensor] | None = None
        self._keep_adapter_keys()

    # ------------------------------------------------------------------ checkpoints: the adapter alone

    def _keep_adapter_keys(self) -> None:
        """Record what training changes (a subclass that adds trainable state calls it again): the
        trainable parameters (LoRA A/B, LCM's guidance embedding) and the family's own persistent
        buffers (LCM's EMA target adapters).  Everything else is the frozen base, rebuilt from the
        pipeline's files on load."""
        own = [n for n, _ in self.named_buffers(recurse=False) if n not in self._non_persistent_buffers_set]
        self.__dict__["_adapter_keys"] = tuple(self.trainable_names()) + tuple(own)

    def checkpoint_state(self) -> dict[str, Tensor]:
        sd = self.state_dict()
        return {k: sd[k] for k in self.__dict__["_adapter_keys"]}

    def load_checkpoint_state(self, state: Mapping[str, Tensor]) -> None:
        want = self.__dict__["_adapter_keys"]
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        if missing or extra:
            raise ValueError(f"{self.name}: the checkpoint's adapter does not fit this model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        self.load_state_dict(dict(state), strict=False)

    def checkpoint_info(self) -> dict[str, Any]:
        """The base's identity: the adapter means nothing on other weights."""
        return {"pipeline": self.cfg.pipeline, "base_files": dict(self.model.identity.get("files") or {})}

    def check_checkpoint_info(self, info: Mapping[str, Any]) -> None:
        if info.get("base_files") is not None:
            check_base(self.cfg.model_copy(update={"base_files": dict(info["base_files"])}), self.model.identity,
                       recorded_in="its checkpoint")

    def _apply(self, fn: Any, recurse: bool = True) -> "DiffusersLora":  # .to(device) moves the VAE too
        super()._apply(fn, recurse)
        self.model.pipe.vae._apply(fn)
        self.model.device = self.device
        return self

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return self.model.noise_shape

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ training

    def _embed(self, captions: list[str]) -> Tensor:
        tok = self.model.pipe.tokenizer(list(captions), padding="max_length", truncation=True,
                                        max_length=self.model.pipe.tokenizer.model_max_length, return_tensors="pt")
        return self.text_model(tok.input_ids.to(self.device))[0]

    def _latents(self, x: Tensor) -> Tensor:
        """The VAE latents of images as the UNet takes them: (posterior mean - shift_factor) *
        scaling_factor, as diffusers' training scripts (FLUX / SD3 VAEs have a shift)."""
        vae = self.model.pipe.vae
        with torch.no_grad():
            z = vae.encode(x.to(vae.dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def _denoise_loss(self, x: Tensor, captions: list[str], generator: torch.Generator | None) -> Tensor:
        from models.base import randn
        from models.diffusion import pred_from_x0_eps, q_sample

        z = self._latents(x)
        n = z.shape[0]
        T = self.alphas_cumprod.numel()
        if generator is None:
            t = torch.randint(0, T, (n,), device=self.device)
        else:
            t = torch.randint(0, T, (n,), generator=generator, device=generator.device).to(self.device)
        eps = randn(z.shape, generator, self.device)
        x_t = q_sample(z, t, eps, self.alphas_cumprod)
        pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[self.prediction_type]
        target = pred_from_x0_eps(z, eps, self.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1), pred)  # type: ignore[arg-type]
        out = self.net(x_t, t, encoder_hidden_states=self._embed(captions)).sample.float()
        return (out - target).pow(2).mean()

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x = self.check_images(batch)
        captions = [str(c) for c in batch.get("caption", [""] * x.shape[0])]
        if self.cfg.cond_dropout > 0:
            from models.base import rand

            drop = rand(len(captions), generator, self.device) < self.cfg.cond_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        loss = self._denoise_loss(x, captions, generator)
        logs = {"instance": float(loss.detach())}
        if self.cfg.prior_prompt is not None and self.cfg.prior_weight > 0:
            prior = self.prior_images(x.shape[0], generator)
            lp = self._denoise_loss(prior, [self.cfg.prior_prompt] * prior.shape[0], generator)
            loss = loss + self.cfg.prior_weight * lp
            logs["prior"] = float(lp.detach())
        return LossOut({"model": loss}, logs)

    def prior_images(self, n: int, generator: torch.Generator | None) -> Tensor:
        """n of the class images the frozen base (adapters off) generated once for prior_prompt."""
        if self._prior is None:
            with self.adapters_off():
                imgs = []
                for k in range(self.cfg.prior_images):
                    g = torch.Generator().manual_seed(10_000 + k)
                    imgs.append(self.model.sample(1, [str(self.cfg.prior_prompt)], steps=self.cfg.prior_steps,
                                                  x_T=torch.randn((1, *self.noise_shape), generator=g))[0])
            self._prior = imgs
        if generator is None:
            idx = torch.randint(0, len(self._prior), (n,))
        else:
            idx = torch.randint(0, len(self._prior), (n,), generator=generator, device=generator.device).cpu()
        return torch.stack([self._prior[int(i)] for i in idx]).to(self.device)

    def adapters_off(self) -> Any:
        from contextlib import contextmanager

        from peft.tuners.lora import LoraLayer

        @contextmanager
        def ctx() -> Any:
            layers = [m for m in self.modules() if isinstance(m, LoraLayer)]
            for m in layers:
                m.enable_adapters(False)
            try:
                yield
            finally:
                for m in layers:
                    m.enable_adapters(True)

        return ctx()

    # ------------------------------------------------------------------ sampling

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        was = self.training
        self.eval()
        try:
            return self.model.sample_result(n, conditioning, sampler, steps, guidance, negative, generator, x_T,
                                            **options)
        finally:
            self.train(was)


def adapter_state(family: DiffusersLora) -> dict[str, dict[str, Tensor]]:
    """The family's LoRA weights in diffusers' layout: {"unet": {...}, "text_encoder": {...}}."""
    from peft.utils import get_peft_model_state_dict

    out = {"unet": {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(family.net).items()}}
    if family.cfg.text_encoder_lora:
        out["text_encoder"] = {k: v.detach().cpu().contiguous()
                               for k, v in get_peft_model_state_dict(family.text_model).items()}
    return out


def export_adapter(checkpoint: str | Path, out: str | Path, *, use_ema: bool = True) -> Path:
    """The adapter alone of a diffusers_lora checkpoint (EMA weights by default), as
    ``<out>/pytorch_lora_weights.safetensors`` in the format ``load_lora_weights`` reads; the file."""
    from diffusers import StableDiffusionPipeline

    from models.checkpoint import load_family

    fam = load_family(checkpoint, use_ema=use_ema)
    if not isinstance(fam, DiffusersLora):
        raise ValueError(f"checkpoint {checkpoint} holds family {getattr(fam, 'name', type(fam).__name__)!r}, "
                         "not diffusers_lora")
    state = adapter_state(fam)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state["unet"],
                                              text_encoder_lora_layers=state.get("text_encoder"),
                                              weight_name=ADAPTER_FILE, safe_serialization=True)
    return out / ADAPTER_FILE



def main(argv: list[str] | None = None) -> int:
    """``python -m models.diffusers_lora export CHECKPOINT OUT_DIR [--raw]``: the adapter alone."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m models.diffusers_lora")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a diffusers_lora checkpoint's adapter in diffusers' LoRA format")
    ex.add_argument("checkpoint", help="a checkpoint folder (runs/<id>/checkpoints/step_*)")
    ex.add_argument("out", help="output folder (gets pytorch_lora_weights.safetensors)")
    ex.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
    a = ap.parse_args(argv)
    print(export_adapter(a.checkpoint, a.out, use_ema=not a.raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
