"""LCM-LoRA: latent consistency distillation of a diffusers UNet into a LoRA adapter (Luo et al. 2023,
"Latent Consistency Models" and "LCM-LoRA"), as a family of the generic trainer.

``family="lcm_lora"`` builds on ``diffusers_lora`` (models/diffusers_lora.py): the pipeline is
loaded and frozen and LoRA adapters are injected into the UNet (here on the convolutions and
the attention / feed-forward projections: ``LCM_TARGETS``, rank 64 by default as in LCM-LoRA).
The *teacher* is the same UNet with the adapters switched off, so nothing is loaded twice.

Consistency function (diffusers' ``LCMScheduler`` parameterisation, so a saved adapter samples
the same there): with the UNet's x0 estimate ``x0(x_t, t)`` (from its eps / v output),

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t),
    c_skip = sd^2 / ((s t)^2 + sd^2),  c_out = s t / sqrt((s t)^2 + sd^2),  sd = 0.5, s = timestep_scaling,

so f(x, 0) = x (the boundary condition) and f is the x0 estimate almost everywhere else.

Training (LCM Algorithm 1, skipping-step schedule): the N-point grid of the LCM scheduler,
t_n = n k - 1 (k = T / N, n = 1..N; ``ddim_steps`` = N = the scheduler's
``original_inference_steps``), a random n and its skip target t_{n-1} = t_n - k (0 for the first);
x_{t_n} = q_sample(z, t_n) of the VAE latent z; the teacher takes DDIM step(s) from t_n to
t_{n-1} under CFG with a scale w drawn from U[guidance_min, guidance_max] (``teacher_substeps``
DDIM steps of k / m timesteps each; 1 = the paper's single solver step); the student's
f(x_{t_n}, t_n, w) is pulled towards the target f(x_{t_{n-1}}, t_{n-1}, w) computed without gradient
by the student itself (``target="stopgrad"``, as diffusers' LCM-LoRA script) or by an EMA of its
adapters (``target="ema"``, decay ``target_ema``, kept in the state_dict so resume is exact).
Distance: pseudo-Huber sqrt(d^2 + c^2) - c (``huber_c``) or L2.

Guidance conditioning: with ``guidance_embedding`` = D > 0 the scale is an input, as in LCM: the
UNet gets the ``time_embedding.cond_proj`` layer that diffusers' UNets with
``time_cond_proj_dim`` have (zero-initialised, trained with the adapters) and is fed the
sinusoidal embedding of w - 1, which is what ``StableDiffusionPipeline`` passes as
``timestep_cond`` for such a UNet.  With 0 (default, as LCM-LoRA) the range's guidance is baked in.

Sampling: the LCM multistep sampler on the scheduler's own timestep grid (``lcm_timesteps``: the
N-point grid reversed and taken at ``floor(linspace(0, N, steps))``, so 4 steps are
999, 759, 499, 259 for N = 50), with the same c_skip / c_out as training.  Between steps the
estimate is re-noised to the next timestep: ``gamma`` = 1 (default) with fresh noise, exactly
``LCMScheduler.step``; ``gamma`` = 0 with the noise the step itself implies
(eps = (x_t - sqrt(ab_t) f) / sqrt(1 - ab_t): a deterministic, DDIM-like step that stays on the ODE
trajectory of the initial noise); in between as Trajectory Consistency Distillation's (Zheng et
al. 2024) strategic stochastic sampling: DDIM down to floor((1 - gamma) t_next), fresh noise up to
t_next.  ``export_adapter`` writes the adapter alone in the diffusers/peft format that
``load_lora_weights`` reads (plus ``guidance_embedding.safetensors`` when there is one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems
from models.base import LossOut, rand, randn
from models.diffusers_lora import ADAPTER_FILE, DiffusersLora, DiffusersLoraConfig
from models.samplers import SampleResult

# the LCM-LoRA script's targets: attention and feed-forward projections, ResNet convolutions and
# their time projections, down/up-sampling convolutions
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
SIGMA_DATA = 0.5  # LCMScheduler's boundary-condition sigma_data
GUIDANCE_FILE = "guidance_embedding.safetensors"


class LcmLoraConfig(DiffusersLoraConfig):
    rank: int = Field(64, ge=1, le=1024, description="LoRA rank r (LCM-LoRA: 64)")
    targets: tuple[str, ...] = Field(LCM_TARGETS, min_length=1, description="UNet module-name suffixes")
    ddim_steps: int = Field(50, ge=2, le=1000, description="N: points of the skipping-step grid (k = T / N); the "
                            "LCM scheduler's original_inference_steps")
    teacher_substeps: int = Field(1, ge=1, le=100, description="DDIM steps the teacher takes across one skip")
    guidance_min: float = Field(1.0, ge=0.0, le=50.0, description="Teacher CFG scale w ~ U[min, max] (1 = no CFG)")
    guidance_max: float = Field(1.0, ge=0.0, le=50.0, description="Upper end of the teacher's CFG range")
    guidance_embedding: int = Field(0, ge=0, le=4096, description="Dimension of the w embedding the student is "
                                    "conditioned on (LCM: 256); 0 = none, the guidance is baked in (LCM-LoRA)")
    target: Literal["stopgrad", "ema"] = Field("stopgrad", description="Target network: the student without "
                                               "gradient, or an EMA of its adapters")
    target_ema: float = Field(0.95, ge=0.0, lt=1.0, description="EMA decay of the target adapters (target='ema')")
    distance: Literal["pseudo_huber", "l2"] = Field("pseudo_huber", description="Consistency loss metric")
    huber_c: float = Field(1e-3, gt=0.0, le=10.0, description="Pseudo-Huber c (diffusers' LCM scripts: 0.001)")
    timestep_scaling: float = Field(10.0, gt=0.0, le=1000.0, description="LCMScheduler's timestep_scaling of "
                                    "c_skip / c_out")
    sample_steps: int = Field(4, ge=1, le=1000, description="Default LCM sampling steps")
    sample_gamma: float = Field(1.0, ge=0.0, le=1.0, description="Re-noising between sampling steps: 1 = fresh "
                                "noise (LCM), 0 = the step's own noise (deterministic), between: TCD's gamma")
    cond_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Caption dropout (LCM distils on the captions)")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("guidance_min", "guidance_max") and self.guidance_max < self.guidance_min:
            p.add(f"guidance_max={self.guidance_max} < guidance_min={self.guidance_min}")
        if p.can("text_encoder_lora", "prior_prompt") and (self.text_encoder_lora or self.prior_prompt is not None):
            p.add("lcm_lora: text_encoder_lora and prior preservation are diffusers_lora options; "
                  "LCM-LoRA distils the UNet only")
        if p.can("sample_steps", "ddim_steps") and self.sample_steps > self.ddim_steps:
            p.add(f"sample_steps={self.sample_steps} > ddim_steps={self.ddim_steps}: the sampling grid is "
                  "a subset of the distillation grid")


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of guidance values (as diffusers' ``get_guidance_scale_embedding``, VDM
    style: w * 1000, sin then cos, log(10000) / (half - 1) frequencies)."""
    w = w.float().flatten() * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def lcm_timesteps(steps: int, ddim_steps: int, train_timesteps: int) -> list[int]:
    """The LCM scheduler's inference timesteps (diffusers ``LCMScheduler.set_timesteps``): the
    N-point grid n k - 1 reversed, at indices floor(linspace(0, N, steps, endpoint=False))."""
    k = train_timesteps // ddim_steps
    origin = (np.arange(1, ddim_steps + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, ddim_steps, num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[idx]]


class LcmLora(DiffusersLora):
    name = "lcm_lora"
    Config = LcmLoraConfig
    samplers = ("lcm",)
    default_sampler = "lcm"
    default_steps = 4
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {"lcm": ("gamma",)}

    cfg: LcmLoraConfig

    def __init__(self, cfg: LcmLoraConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        self.default_steps = c.sample_steps
        T = self.alphas_cumprod.numel()
        if T % c.ddim_steps:
            raise ValueError(f"lcm_lora: ddim_steps={c.ddim_steps} must divide the scheduler's {T} training timesteps")
        self.k = T // c.ddim_steps
        self.register_buffer("grid", torch.arange(1, c.ddim_steps + 1) * self.k - 1, persistent=False)
        if c.guidance_embedding:
            te = self.net.time_embedding
            if getattr(te, "cond_proj", None) is None:
                te.cond_proj = nn.Linear(c.guidance_embedding, te.linear_1.in_features, bias=False)
                nn.init.zeros_(te.cond_proj.weight)  # starts as the base model: w adds nothing yet
                self.net.register_to_config(time_cond_proj_dim=c.guidance_embedding)
            te.cond_proj.requires_grad_(True)
        if c.target == "ema":  # the target adapters: buffers in the state_dict, outside the optimizer
            for i, (_, p) in enumerate(self._adapter_params()):
                self.register_buffer(f"target_{i}", p.detach().clone())
        self._keep_adapter_keys()  # + the guidance embedding and the target adapters

    def _adapter_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ consistency function

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """LCMScheduler's c_skip, c_out at integer timesteps t."""
        st = t.double() * self.cfg.timestep_scaling
        c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
        c_out = st / (st**2 + SIGMA_DATA**2).sqrt()
        return c_skip.float(), c_out.float()

    def _ab(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod.to(t.device)[t.long()].view(-1, 1, 1, 1)

    def x0_eps(self, out: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) estimates from the UNet output at (x_t, t), per the scheduler's prediction type."""
        ab = self._ab(t)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "epsilon":
            return (x - s * out) / a, out
        if self.prediction_type == "v_prediction":
            return a * x - s * out, a * out + s * x
        return out, (x - a * out) / s  # "sample"

    def unet(self, x: Tensor, t: Tensor, ctx: Tensor, w: Tensor | None) -> Tensor:
        cond = guidance_embedding(w - 1.0, self.cfg.guidance_embedding) if w is not None and self.cfg.guidance_embedding else None
        return self.net(x, t, encoder_hidden_states=ctx, timestep_cond=cond).sample.float()

    def consistency(self, x: Tensor, t: Tensor, ctx: Tensor, w: Tensor | None) -> Tensor:
        x0, _ = self.x0_eps(self.unet(x, t, ctx, w), x, t)
        c_skip, c_out = self.scalings(t)
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def teacher_step(self, x: Tensor, t: Tensor, t_prev: Tensor, ctx: Tensor, uncond: Tensor | None,
                     w: Tensor) -> Tensor:
        """The teacher (adapters off) from t to t_prev: ``teacher_substeps`` DDIM steps under CFG w."""
        m = self.cfg.teacher_substeps
        with self.adapters_off():
            for j in range(m):
                ta = t - (t - t_prev) * j // m
                tb = t - (t - t_prev) * (j + 1) // m
                if uncond is None:
                    out = self.net(x, ta, encoder_hidden_states=ctx).sample.float()
                else:
                    both = self.net(torch.cat([x, x]), torch.cat([ta, ta]),
                                    encoder_hidden_states=torch.cat([uncond, ctx])).sample.float()
                    u, c = both.chunk(2)
                    out = u + w.view(-1, 1, 1, 1) * (c - u)
                x0, eps = self.x0_eps(out, x, ta)
                ab = self._ab(tb)
                x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        return x

    def _target(self, x: Tensor, t: Tensor, ctx: Tensor, w: Tensor | None) -> Tensor:
        with torch.no_grad():
            if self.cfg.target == "stopgrad":
                return self.consistency(x, t, ctx, w)
            params = [p for _, p in self._adapter_params()]
            live = [p.detach().clone() for p in params]
            try:
                for i, p in enumerate(params):
                    p.copy_(getattr(self, f"target_{i}"))
                return self.consistency(x, t, ctx, w)
            finally:
                for p, v in zip(params, live):
                    p.copy_(v)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.target != "ema":
            return
        mu = self.cfg.target_ema
        for i, (_, p) in enumerate(self._adapter_params()):
            getattr(self, f"target_{i}").lerp_(p.detach(), 1.0 - mu)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        c = self.cfg
        x = self.check_images(batch)
        captions = [str(s) for s in batch.get("caption", [""] * x.shape[0])]
        if c.cond_dropout > 0:
            drop = rand(len(captions), generator, self.device) < c.cond_dropout
            captions = ["" if d else s for s, d in zip(captions, drop.tolist())]
        z = self._latents(x)
        B, dev = z.shape[0], z.device
        g_dev = generator.device if generator is not None else dev
        n = torch.randint(0, c.ddim_steps, (B,), generator=generator, device=g_dev).to(dev)
        t = self.grid.to(dev)[n]
        t_prev = (t - self.k).clamp(min=0)
        eps = randn(z.shape, generator, dev)
        ab = self._ab(t)
        x_t = ab.sqrt() * z + (1 - ab).sqrt() * eps
        w = c.guidance_min + (c.guidance_max - c.guidance_min) * rand(B, generator, dev)
        with torch.no_grad():
            ctx = self._embed(captions)
            uncond = self._embed([""] * B) if c.guidance_max != 1.0 or c.guidance_min != 1.0 else None
        x_prev = self.teacher_step(x_t, t, t_prev, ctx, uncond, w)
        wc = w if c.guidance_embedding else None
        target = self._target(x_prev, t_prev, ctx, wc)  # first: an EMA target swaps weights in place
        pred = self.consistency(x_t, t, ctx, wc)
        diff = pred - target
        if c.distance == "l2":
            loss = diff.pow(2).mean()
        else:
            loss = (diff.pow(2) + c.huber_c**2).sqrt().mean() - c.huber_c
        return LossOut({"model": loss}, {"loss": float(loss.detach())})

    # ------------------------------------------------------------------ sampling

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """LCM multistep sampling (see the module doc); ``guidance`` is the embedded w when the student
        has a guidance embedding, else a CFG scale on the student (1 = none: the guidance is baked in)."""
        sampler = sampler or self.default_sampler
        if sampler not in self.samplers:
            raise ValueError(f"lcm_lora samples with {list(self.samplers)}, not {sampler!r}")
        unknown = set(options) - {"gamma"}
        if unknown:
            raise ValueError(f"lcm_lora sampling takes the option 'gamma' only, not {sorted(unknown)}")
        gamma = float(options.get("gamma", self.cfg.sample_gamma))
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma} must be in [0, 1]")
        steps = int(steps or self.default_steps)
        if steps > self.cfg.ddim_steps:
            raise ValueError(f"lcm_lora: {steps} steps > ddim_steps={self.cfg.ddim_steps} (the distillation grid)")
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self._lcm_sample(n, conditioning, steps, float(guidance), negative, generator, x_T, gamma)
        finally:
            self.train(was)

    def _lcm_sample(self, n: int, conditioning: Any, steps: int, guidance: float, negative: Any,
                    generator: torch.Generator | None, x_T: Tensor | None, gamma: float) -> SampleResult:
        model = self.model
        prompts = model._prompts(conditioning, n, "conditioning") or [""] * n
        neg = model._prompts(negative, n, "negative")
        shape = (n, *self.noise_shape)
        if x_T is None:
            x_T = torch.randn(shape, generator=generator)
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        dev = self.device
        ctx = self._embed(prompts)
        embedded = bool(self.cfg.guidance_embedding)
        cfg_pass = not embedded and (guidance != 1.0 or neg is not None)
        uncond = self._embed(neg or [""] * n) if cfg_pass else None
        w = torch.full((n,), guidance, device=dev) if embedded else None
        ts = lcm_timesteps(steps, self.cfg.ddim_steps, self.alphas_cumprod.numel())
        x = x_T.to(dev, torch.float32)
        nfe = 0
        for i, t_int in enumerate(ts):
            t = torch.full((n,), t_int, device=dev, dtype=torch.long)
            if uncond is None:
                out = self.unet(x, t, ctx, w)
            else:
                both = self.net(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, ctx])).sample.float()
                u, cc = both.chunk(2)
                out = u + guidance * (cc - u)
            nfe += 1
            x0, _ = self.x0_eps(out, x, t)
            c_skip, c_out = self.scalings(t)
            denoised = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0
            if i == len(ts) - 1:
                x = denoised
                break
            t_next = ts[i + 1]
            ab_t, ab_n = self._ab(t), self.alphas_cumprod[t_next].to(dev)
            if gamma >= 1.0:  # LCMScheduler.step: fresh noise at the next timestep
                noise = self._noise(x.shape, generator, dev)
                x = ab_n.sqrt() * denoised + (1 - ab_n).sqrt() * noise
                continue
            eps_hat = (x - ab_t.sqrt() * denoised) / (1 - ab_t).sqrt()
            s = int(math.floor((1.0 - gamma) * t_next))
            ab_s = self.alphas_cumprod[s].to(dev)
            x = ab_s.sqrt() * denoised + (1 - ab_s).sqrt() * eps_hat  # DDIM down to s
            if s != t_next:  # then forward-noise from s up to t_next
                noise = self._noise(x.shape, generator, dev)
                r = ab_n / ab_s
                x = r.sqrt() * x + (1 - r).sqrt() * noise
        return SampleResult(model.decode(x).float().clamp(-1, 1).cpu(), nfe)

    @staticmethod
    def _noise(shape: tuple[int, ...], generator: torch.Generator | None, dev: torch.device) -> Tensor:
        if generator is None:
            return torch.randn(shape, device=dev)
        return torch.randn(shape, generator=generator, device=generator.device).to(dev)


def export_adapter(checkpoint: str | Path, out: str | Path, *, use_ema: bool = True) -> Path:
    """The adapter alone of an lcm_lora checkpoint as ``<out>/pytorch_lora_weights.safetensors``
    (diffusers/peft LoRA format, for ``load_lora_weights``; sample it with ``LCMScheduler``), plus
    ``<out>/guidance_embedding.safetensors`` (``time_embedding.cond_proj.weight``) when the student is
    guidance-conditioned (:func:`attach_guidance_embedding` puts it on a pipeline's UNet)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from models.checkpoint import load_family
    from models.diffusers_lora import adapter_state

    fam = load_family(checkpoint, use_ema=use_ema)
    if not isinstance(fam, LcmLora):
        raise ValueError(f"checkpoint {checkpoint} holds family {getattr(fam, 'name', type(fam).__name__)!r}, "
                         "not lcm_lora")
    state = adapter_state(fam)
    unet = {k: v for k, v in state["unet"].items() if "cond_proj" not in k}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=unet, weight_name=ADAPTER_FILE,
                                              safe_serialization=True)
    if fam.cfg.guidance_embedding:
        w = fam.net.time_embedding.cond_proj.weight.detach().cpu().contiguous()
        save_file({"time_embedding.cond_proj.weight": w}, str(out / GUIDANCE_FILE),
                  metadata={"time_cond_proj_dim": str(fam.cfg.guidance_embedding)})
    return out / ADAPTER_FILE


def attach_guidance_embedding(unet: Any, folder: str | Path) -> None:
    """Give a diffusers UNet the exported w embedding (``time_embedding.cond_proj``, and
    ``time_cond_proj_dim`` in its config, so ``StableDiffusionPipeline`` feeds it the guidance)."""
    from safetensors import safe_open

    f = Path(folder) / GUIDANCE_FILE
    with safe_open(str(f), framework="pt") as fh:
        weight = fh.get_tensor("time_embedding.cond_proj.weight")
    te = unet.time_embedding
    te.cond_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(te.linear_1.weight.device,
                                                                               te.linear_1.weight.dtype)
    with torch.no_grad():
        te.cond_proj.weight.copy_(weight)
    unet.register_to_config(time_cond_proj_dim=int(weight.shape[1]))
