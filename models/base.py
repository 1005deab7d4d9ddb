"""The model-family contract: what a generic trainer and evaluator may rely on.

A *family* (DDPM, EDM, flow matching, a GAN, an autoencoder, ...) is a ``torch.nn.Module``
that owns its networks and answers four questions:

* ``optimizers_spec()``   which parameters each optimizer updates ({"model": [...]} for
                          diffusion; {"generator": ..., "discriminator": ...} for a GAN);
* ``loss(batch, gen)``    one scalar per optimizer name (``LossOut.losses``) plus float logs;
* ``sample(n, ...)``      images in [-1, 1] (or latents, see ``FamilyConfig.data``);
* ``encode_condition``    labels / captions -> the networks' ``cond`` dict.

``train_step`` below is the reference step a trainer performs with that contract; see
docs/FAMILIES.md for EMA, checkpoints, DDP, GANs and latent diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch
from pydantic import ConfigDict, Field
from torch import Tensor, nn

from imagegen.checks import AllProblems, Problems
from models.diffusion import cfg_wrap
from models.nets import NET_KINDS, build_net
from models.nets.layers import Denoiser
from models.samplers import SampleResult

Conditioning = Literal["none", "class", "text"]

# Net fields the family sets from its own config; overriding them would desync family and net.
_FAMILY_OWNED_NET_FIELDS = {
    "in_channels": "channels",
    "out_channels": "channels",
    "image_size": "image_size",
    "num_classes": "num_classes",
    "text_dim": "text_encoder",
    "cross_attention": "text_tokens",
}
_PLACEHOLDER_TEXT_DIM = 8  # only used to validate net_overrides before the encoder is loaded


class FamilyConfig(AllProblems):
    """Fields every family has; a family subclasses it to add its own (schedule, sampler knobs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # False for families without a models/nets denoiser (a GAN, an autoencoder): the net_*
    # fields are then not validated against a U-Net/DiT preset.
    builds_denoiser: ClassVar[bool] = True

    net: Literal["unet", "dit"] = Field("unet", description="Denoiser architecture (models/nets)")
    net_size: Literal["tiny", "S", "B"] = Field("S", description="Named preset of the architecture")
    net_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Preset fields to override (e.g. depth, dropout, time_scale)"
    )
    image_size: int = Field(32, ge=4, le=1024, description="Side of the (square) images or latents")
    channels: int = Field(3, ge=1, le=64, description="Image (or latent) channels")
    data: Literal["pixels", "latents"] = Field(
        "pixels",
        description="pixels: batches must lie in [-1, 1] and samples are clamped to it; latents: "
        "an autoencoder's scaled latents, neither checked nor clamped",
    )
    conditioning: Conditioning = Field("none", description="What the model is conditioned on")
    num_classes: int = Field(0, ge=0, le=1_000_000, description="Labels 0..num_classes-1 (class conditioning)")
    cond_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Probability of replacing the condition by the null one (CFG)"
    )
    text_encoder: str | None = Field(
        None, description="open_clip spec of the frozen text tower (imagegen.clip), text conditioning only"
    )
    text_tokens: bool = Field(
        True, description="Cross-attend to text tokens (else the pooled embedding alone conditions the net)"
    )
    autoencoder: str | None = Field(
        None, description="data='latents': the autoencoder checkpoint (or 'run:<id>') whose decoder turns "
        "samples back into images"
    )
    latent_scale: float = Field(1.0, gt=0.0, description="data='latents': the scale the latents were multiplied "
                                "by (unit variance); samples are divided by it before decoding")

    def problems(self, p: Problems) -> None:
        """Every cross-field problem of the family fields, all reported at once (imagegen/checks.py)."""
        super().problems(p)
        if p.can("conditioning", "num_classes"):
            if self.conditioning == "class" and self.num_classes < 1:
                p.add("conditioning='class' needs num_classes >= 1")
            if self.conditioning != "class" and self.num_classes:
                p.add(f"num_classes={self.num_classes} is only used with conditioning='class'")
        if p.can("conditioning", "text_encoder"):
            if self.conditioning == "text" and not (self.text_encoder and self.text_encoder.strip()):
                p.add("conditioning='text' needs text_encoder (an open_clip spec string)")
            if self.conditioning != "text" and self.text_encoder is not None:
                p.add("text_encoder is only used with conditioning='text'")
        if p.can("autoencoder", "data") and self.autoencoder is not None and self.data != "latents":
            p.add("autoencoder is only used with data='latents'")
        owned = sorted(set(self.net_overrides) & set(_FAMILY_OWNED_NET_FIELDS)) if p.can("net_overrides") else []
        if owned:
            hint = ", ".join(f"{k} -> {_FAMILY_OWNED_NET_FIELDS[k]}" for k in owned)
            p.add(f"net_overrides may not set {owned}; use the family fields ({hint})")
        elif self.builds_denoiser and not p.bad:  # the net check reads most fields
            try:
                self.net_config(_PLACEHOLDER_TEXT_DIM, 1.0)  # surface bad overrides now, not at build time
            except ValueError as exc:
                p.add(str(exc).removeprefix(f"{type(self).__name__}: "))

    def net_config(self, text_dim: int, time_scale: float) -> Any:
        """The network config: preset ``net_size`` + family-owned fields + ``net_overrides``."""
        cfg_cls, _ = NET_KINDS[self.net]
        text = self.conditioning == "text"
        fields = dict(
            in_channels=self.channels,
            out_channels=self.channels,
            image_size=self.image_size,
            num_classes=self.num_classes,
            text_dim=text_dim if text else 0,
            cross_attention=text and self.text_tokens,
            time_scale=time_scale,
        )
        try:
            return cfg_cls.preset(self.net_size, **{**fields, **self.net_overrides})
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: net {self.net!r} size {self.net_size!r} with "
                             f"net_overrides {self.net_overrides}: {exc}") from exc


@dataclass
class LossOut:
    """One scalar loss per optimizer name, and plain floats to log."""

    losses: dict[str, Tensor]
    logs: dict[str, float] = field(default_factory=dict)


def randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise drawn on the generator's device, then moved: a CPU generator stays usable
    (and reproducible) when the model runs on a GPU."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def rand(n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """U[0, 1) of shape (n,), same device rule as :func:`randn`."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


class Family(nn.Module):
    """Base of every model family.  Subclasses set the class attributes and implement ``loss``
    and ``run_sampler`` (diffusion-like) or override ``sample_result`` (anything else)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[FamilyConfig]] = FamilyConfig
    samplers: ClassVar[tuple[str, ...]] = ()
    default_sampler: ClassVar[str] = ""
    default_steps: ClassVar[int] = 50
    conditioning: ClassVar[frozenset[str]] = frozenset({"none", "class", "text"})
    # Extra keyword options each sampler accepts in sample(..., **options).
    sampler_options: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Scale of the level fed to the net's sinusoidal embedding (DenoiserConfig.time_scale).
    time_scale: ClassVar[float] = 1.0
    # True when loss() reads batch["meta"] (the samples' .json), e.g. reflow's noise seeds.
    needs_meta: ClassVar[bool] = False
    # True when loss() and the samplers work on any H x W the denoiser accepts (multiples of its
    # ``size_multiple``), so it trains on aspect-ratio buckets and samples at height=/width=.
    any_size: ClassVar[bool] = False

    def __init__(self, cfg: FamilyConfig | Mapping[str, Any]) -> None:
        super().__init__()
        if isinstance(cfg, Mapping):
            cfg = self.Config(**cfg)
        if not isinstance(cfg, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__} (or a dict of its "
                            f"fields), got {type(cfg).__name__}")
        if cfg.conditioning not in self.conditioning:
            raise ValueError(f"{type(self).__name__}: conditioning {cfg.conditioning!r} is not supported; "
                             f"this family consumes {sorted(self.conditioning)}")
        self.cfg = cfg
        self.text_dim = 0
        if cfg.conditioning == "text":
            from models.text import get_text_encoder

            enc = get_text_encoder(str(cfg.text_encoder))
            self.text_dim = enc.dim
            null = enc([""])  # the empty prompt is THE null condition, at training and sampling
            # Non-persistent buffers: they follow .to(device) but stay out of checkpoints
            # (they are a function of the frozen encoder, rebuilt at load).
            self.register_buffer("null_tokens", null.tokens, persistent=False)
            self.register_buffer("null_mask", null.mask, persistent=False)
            self.register_buffer("null_pooled", null.pooled, persistent=False)

    # ------------------------------------------------------------------ building blocks

    def build_denoiser(self) -> Denoiser:
        """The configured U-Net / DiT with this family's conditioning and time scale."""
        return build_net(self.cfg.net, self.cfg.net_config(self.text_dim, self.time_scale))

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one sample's starting noise ``x_T`` (a latent for families that decode one)."""
        return (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)

    def size_multiple(self) -> int | None:
        """The sides an input other than the square ``image_size`` must be multiples of; None when
        this family takes only its square (``any_size`` False, or no denoiser to ask)."""
        net = getattr(self, "net", None)
        if not self.any_size or net is None or not hasattr(net, "size_multiple"):
            return None
        return int(net.size_multiple)

    def check_size(self, height: int, width: int, where: str) -> None:
        """Refuse an H x W this family cannot train or sample at, naming the sizes it can."""
        s, m = self.cfg.image_size, self.size_multiple()
        if (height, width) == (s, s):
            return
        if m is None:
            raise ValueError(f"{where}: {type(self).__name__} takes only {s}x{s} (its image_size); "
                             f"got {height}x{width}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= m and v % m == 0 for v in (height, width)):
            raise ValueError(f"{where}: height and width must be positive multiples of {m} (the denoiser's "
                             f"patch / downsampling), got {height}x{width}")

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def optimizers_spec(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimizer name; one "model" optimizer over every trainable parameter."""
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    # ------------------------------------------------------------------ data and conditions

    def check_images(self, batch: Mapping[str, Any]) -> Tensor:
        """batch["image"] as a float tensor [B, C, H, W] matching the config (clear error if not)."""
        where = f"{type(self).__name__}.loss"
        if not isinstance(batch, Mapping) or "image" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"{where}: batch must be a dict with an 'image' tensor, got keys {keys}")
        x = batch["image"]
        c, s = self.cfg.channels, self.cfg.image_size
        square = isinstance(x, Tensor) and x.ndim == 4 and x.shape[1:] == (c, s, s)
        if not square and isinstance(x, Tensor) and x.ndim == 4 and x.shape[1] == c and self.size_multiple():
            self.check_size(int(x.shape[2]), int(x.shape[3]), where)  # an aspect-ratio bucket
        elif not isinstance(x, Tensor) or not x.is_floating_point() or not square:
            desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{where}: batch['image'] must be a float tensor [B, {c}, {s}, {s}], got {desc}")
        if not x.is_floating_point():
            raise ValueError(f"{where}: batch['image'] must be a float tensor, got {x.dtype}")
        if x.shape[0] < 1:
            raise ValueError(f"{where}: batch['image'] is empty")
        if self.cfg.data == "pixels":
            lo_t, hi_t = torch.aminmax(x)  # one pass; a NaN makes both NaN and fails the test below
            lo, hi = float(lo_t), float(hi_t)
            if not (lo >= -1.001 and hi <= 1.001):
                raise ValueError(f"{where}: batch['image'] must lie in [-1, 1] (data='pixels'), got "
                                 f"min {lo:.4g} max {hi:.4g}; scale uint8 images as x / 127.5 - 1")
        return x

    def _text(self, captions: Any, n: int, where: str, device: torch.device) -> dict[str, Tensor]:
        if isinstance(captions, str):
            captions = [captions] * n
        if not isinstance(captions, (list, tuple)) or len(captions) != n or \
                not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{where}: captions must be a list of {n} strings, got {captions!r:.200}")
        from models.text import get_text_encoder

        emb = get_text_encoder(str(self.cfg.text_encoder), device)(list(captions))
        cond = {"pooled": emb.pooled.to(device)}
        if self.cfg.text_tokens:
            cond["tokens"], cond["token_mask"] = emb.tokens.to(device), emb.mask.to(device)
        return cond

    def _labels(self, labels: Any, n: int, where: str, device: torch.device) -> dict[str, Tensor]:
        y = torch.as_tensor(labels, device=device)
        if y.ndim == 0:
            y = y.expand(n)
        if y.dtype not in (torch.int64, torch.int32) or y.shape != (n,):
            raise ValueError(f"{where}: labels must be {n} integers, got {y.dtype} {tuple(y.shape)}")
        k = self.cfg.num_classes
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise ValueError(f"{where}: labels must lie in [0, {k - 1}], got min {int(y.min())} max {int(y.max())}")
        return {"class": y.long()}

    def condition_from(self, value: Any, n: int, where: str) -> dict[str, Tensor]:
        """Labels (class) or captions (text) -> the net's cond dict, for n samples."""
        dev = self.device
        if self.cfg.conditioning == "class":
            return self._labels(value, n, where, dev)
        if self.cfg.conditioning == "text":
            return self._text(value, n, where, dev)
        return {}

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch["label"] / batch["caption"] -> cond dict (no dropout); {} when unconditional."""
        where = f"{type(self).__name__}.encode_condition"
        n = self.check_images(batch).shape[0]
        key = {"class": "label", "text": "caption"}.get(self.cfg.conditioning)
        if key is None:
            return {}
        if key not in batch:
            raise ValueError(f"{where}: conditioning={self.cfg.conditioning!r} needs batch[{key!r}], "
                             f"got keys {sorted(batch)}")
        return self.condition_from(batch[key], n, where)

    def null_condition(self, n: int) -> dict[str, Tensor]:
        """The unconditional branch: null class index / empty-prompt embedding; {} if unconditional."""
        if self.cfg.conditioning == "class":
            return {"class": torch.full((n,), self.cfg.num_classes, dtype=torch.long, device=self.device)}
        if self.cfg.conditioning == "text":
            cond = {"pooled": self.null_pooled.expand(n, -1)}
            if self.cfg.text_tokens:
                cond["tokens"] = self.null_tokens.expand(n, -1, -1)
                cond["token_mask"] = self.null_mask.expand(n, -1)
            return cond
        return {}

    def drop_condition(self, cond: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Tensor]:
        """Replace each sample's condition by the null one with probability cfg.cond_dropout."""
        p = self.cfg.cond_dropout
        if not cond or p == 0:
            return cond
        n = next(iter(cond.values())).shape[0]
        drop = rand(n, generator, self.device) < p
        null = self.null_condition(n)
        return {k: torch.where(drop.view(-1, *([1] * (v.ndim - 1))), null[k].to(v.dtype), v)
                for k, v in cond.items()}

    def training_condition(self, batch: Mapping[str, Any], generator: torch.Generator | None) -> dict[str, Tensor]:
        return self.drop_condition(self.encode_condition(batch), generator)

    # ------------------------------------------------------------------ training

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(batch, generator)")

    def optimizers_for_step(self, step: int) -> list[str]:
        """Names of the optimizers that update at (0-based) training ``step``; all by default.  A
        GAN with a D:G ratio of k returns only the discriminator on k-1 of every k steps; losses of
        the others are still computed and logged, not backpropagated."""
        names = self.__dict__.get("_optimizer_names")
        if names is None:  # the names never change: no need to rebuild the parameter lists each step
            names = list(self.optimizers_spec())
            self.__dict__["_optimizer_names"] = names
        return list(names)

    def after_step(self) -> None:
        """Called by the trainer on every rank after each optimizer step that was taken (not on
        skipped steps), before the EMA update: e.g. a consistency model's target network update.
        State it changes must live in the state_dict (buffers or frozen parameters) to be
        checkpointed."""

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Tensor]:
        """The tensors a training checkpoint holds (``model/<k>``; the EMA shadows their floating
        entries, ``ema/<k>``): the whole state_dict by default.  A family built on a frozen base it
        rebuilds itself (a pretrained pipeline plus an adapter) returns only what training changes,
        with :meth:`checkpoint_info` naming the base and :meth:`load_checkpoint_state` loading them."""
        return self.state_dict()

    def load_checkpoint_state(self, state: Mapping[str, Tensor]) -> None:
        """Load what :meth:`checkpoint_state` returned (every key, nothing else)."""
        self.load_state_dict(state, strict=True)

    def checkpoint_info(self) -> dict[str, Any]:
        """JSON the checkpoint records next to those tensors (``state.json`` "family_info"), e.g. the
        identity of a base the tensors apply to; {} by default."""
        return {}

    def check_checkpoint_info(self, info: Mapping[str, Any]) -> None:
        """Refuse (ValueError, saying why) a checkpoint whose :meth:`checkpoint_info` does not fit
        this family as built, before anything is loaded; checkpoints without it record {}."""

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        """= loss(): DistributedDataParallel syncs gradients only for calls through forward."""
        return self.loss(batch, generator)

    # ------------------------------------------------------------------ sampling

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        """Integrate from unit Gaussian ``x_T`` with ``net_fn(x, level) -> net output`` (already
        conditioned and guided)."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_sampler or sample_result")

    def guided_net(self, cond: dict[str, Tensor], uncond: dict[str, Tensor], guidance: float) -> Any:
        """``fn(x, level)`` running self.net under ``cond``; with guidance != 1 one doubled-batch
        forward combined by CFG (valid for eps / v / velocity / EDM-F outputs: all linear)."""

        def raw(x: Tensor, level: Tensor, **c: Tensor) -> Tensor:
            return self.net(x, level, c)

        if guidance == 1.0:
            return lambda x, level: raw(x, level, **cond)
        return cfg_wrap(raw, guidance, cond, uncond)

    def _check_sampling(self, sampler: str | None, steps: int | None, guidance: float,
                        conditioning: Any, negative: Any, options: dict[str, Any]) -> tuple[str, int]:
        name = type(self).__name__
        sampler = self.default_sampler if sampler is None else sampler
        if sampler not in self.samplers:
            raise ValueError(f"{name}.sample: unknown sampler {sampler!r}; this family has {list(self.samplers)}")
        steps = self.default_steps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"{name}.sample: steps must be a positive int, got {steps!r}")
        allowed = self.sampler_options.get(sampler, ())
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise ValueError(f"{name}.sample: sampler {sampler!r} takes no option(s) {bad}; it accepts {list(allowed)}")
        if not isinstance(guidance, (int, float)) or not guidance >= 0:
            raise ValueError(f"{name}.sample: guidance must be a number >= 0, got {guidance!r}")
        if self.cfg.conditioning == "none":
            if guidance != 1.0:
                raise ValueError(f"{name}.sample: guidance={guidance} needs a conditional model; this one "
                                 f"has conditioning='none' (use guidance=1.0)")
            if conditioning is not None or negative is not None:
                raise ValueError(f"{name}.sample: conditioning/negative given but the model is unconditional")
        elif guidance != 1.0 and conditioning is None:
            raise ValueError(f"{name}.sample: guidance={guidance} needs conditioning (labels or captions)")
        return sampler, steps

    def sample_result(
        self,
        n: int,
        conditioning: Any = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        negative: Any = None,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        **options: Any,
    ) -> SampleResult:
        """Like :meth:`sample` but returns the sampler's SampleResult (sample, nfe, trajectory)."""
        name = type(self).__name__
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}.sample: n must be a positive int, got {n!r}")
        sampler, steps = self._check_sampling(sampler, steps, guidance, conditioning, negative, options)
        where = f"{name}.sample"
        h = self.cfg.image_size if height is None else height
        w = self.cfg.image_size if width is None else width
        self.check_size(h, w, where)
        cond = self.null_condition(n) if conditioning is None else self.condition_from(conditioning, n, where)
        uncond = self.null_condition(n) if negative is None else self.condition_from(negative, n, where + " negative")
        shape = (n, self.cfg.channels, h, w)
        if x_T is None:
            x_T = randn(shape, generator, self.device)
        elif tuple(x_T.shape) != shape:
            raise ValueError(f"{where}: x_T must have shape {shape}, got {tuple(x_T.shape)}")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                res = self.run_sampler(self.guided_net(cond, uncond, float(guidance)), x_T.to(self.device),
                                       sampler, steps, generator, options)
        finally:
            self.train(was_training)
        if self.cfg.data == "pixels":
            res.sample = res.sample.clamp(-1, 1)
        elif self.cfg.autoencoder:
            res.sample = self.decode_latents(res.sample)
        return res

    def attach_autoencoder(self, autoencoder: Any) -> None:
        """Hand in the (frozen) autoencoder whose decoder turns this family's latents into images;
        it is not a submodule: no optimizer, EMA or checkpoint sees it."""
        object.__setattr__(self, "_autoencoder", autoencoder)

    def decode_latents(self, z: Tensor, autoencoder: Any = None) -> Tensor:
        """Scaled latents -> images in [-1, 1] through ``autoencoder``, else the attached one
        (:meth:`attach_autoencoder`), else the one ``cfg.autoencoder`` names, loaded once through
        ``models.checkpoint.load_family``."""
        ae = autoencoder if autoencoder is not None else self.__dict__.get("_autoencoder")
        if ae is None and str(self.cfg.autoencoder).startswith("diffusers:"):  # a pretrained diffusers VAE
            from models.hf_diffusers import DiffusersVAE

            ae = DiffusersVAE(str(self.cfg.autoencoder), device=str(self.device))
            self.attach_autoencoder(ae)
        if ae is None:
            from models.checkpoint import load_family

            ae = load_family(str(self.cfg.autoencoder), device=self.device)
            self.attach_autoencoder(ae)
        with torch.no_grad():
            if hasattr(ae, "decode_tokens"):  # a tokenizer: z holds token ids
                return ae.decode_tokens(z.to(ae.device).round().long()).clamp(-1, 1).to(z.device)
            return ae.decode(z.to(ae.device) / self.cfg.latent_scale).clamp(-1, 1).to(z.device)

    def sample(
        self,
        n: int,
        conditioning: Any = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        negative: Any = None,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        **options: Any,
    ) -> Tensor:
        """n samples [n, C, H, W] in [-1, 1] (pixels).

        conditioning: labels (class) or captions (text; a single string is repeated), None = the
        null condition.  negative: labels/captions replacing the null branch of CFG.  guidance:
        CFG scale (1 = off).  x_T: the starting *unit* Gaussian noise (families scale it, e.g.
        EDM by sigma_max).  height/width: the size of x (pixels, or latents for a latent model),
        default ``image_size``; other sizes (an aspect-ratio bucket's) need an ``any_size`` family
        and sides that are multiples of :meth:`size_multiple`.  options: sampler knobs listed in
        ``sampler_options``.
        """
        size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
        return self.sample_result(n, conditioning, sampler, steps, guidance, negative, generator, x_T,
                                  **size, **options).sample


def check_optimizers_spec(family: Family) -> dict[str, list[nn.Parameter]]:
    """optimizers_spec() with its invariants checked: non-empty groups, no parameter in two."""
    spec = family.optimizers_spec()
    if not spec:
        raise ValueError(f"{type(family).__name__}.optimizers_spec() is empty")
    seen: dict[int, str] = {}
    for name, params in spec.items():
        if not params:
            raise ValueError(f"{type(family).__name__}.optimizers_spec(): optimizer {name!r} has no parameters")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"{type(family).__name__}.optimizers_spec(): a parameter is in both "
                                 f"{seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    return spec


def check_losses(family: Family, out: LossOut, names: Sequence[str]) -> None:
    """``family.loss`` returned one scalar per optimizer name (``names``)."""
    if set(out.losses) != set(names):
        raise ValueError(f"{type(family).__name__}.loss returned losses {sorted(out.losses)}, "
                         f"optimizers_spec() names {list(names)}")
    bad_shape = [n for n in names if out.losses[n].ndim != 0]
    if bad_shape:
        raise ValueError(f"{type(family).__name__}.loss: loss(es) {bad_shape} are not scalars")


def backward_losses(out: LossOut, spec: Mapping[str, list[nn.Parameter]], active: Sequence[str],
                    divisor: float = 1) -> None:
    """Backpropagate each ``active`` loss (divided by ``divisor``, e.g. the micro-batches
    accumulated) into its own optimizer's parameters only (``backward(inputs=...)``); with a
    single optimizer a plain ``backward()`` (so DDP's gradient hooks fire).

    Backward-all-then-step-all keeps each graph valid (a GAN's generator loss reads the
    discriminator's weights; stepping the discriminator first would modify them in place)."""
    names = list(spec)
    if len(names) == 1:
        (out.losses[names[0]] / divisor).backward()
        return
    for i, n in enumerate(active):
        (out.losses[n] / divisor).backward(inputs=spec[n], retain_graph=i + 1 < len(active))


def train_step(family: Family, optimizers: Mapping[str, torch.optim.Optimizer], batch: Mapping[str, Any],
               generator: torch.Generator | None = None) -> LossOut:
    """One step of the generic trainer's contract without its machinery (no accumulation, DDP,
    clipping or skipped steps): every loss backpropagated into its own optimizer's parameters
    (:func:`backward_losses`, as the trainer does), then every optimizer steps."""
    out = family.loss(batch, generator)
    spec = check_optimizers_spec(family)
    if set(out.losses) != set(spec) or set(optimizers) != set(spec):
        raise ValueError(f"train_step: loss names {sorted(out.losses)}, optimizer names {sorted(optimizers)} and "
                         f"optimizers_spec names {sorted(spec)} must be the same")
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    names = list(spec)
    for name in names:
        loss = out.losses[name]
        if loss.ndim != 0 or not torch.isfinite(loss):
            raise FloatingPointError(f"train_step: loss {name!r} is not a finite scalar: {loss}")
    backward_losses(out, spec, names)
    for name in names:
        optimizers[name].step()
    return out
