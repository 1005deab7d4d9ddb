"""Personalisation of the project's own families: textual inversion and DreamBooth-style fine-tuning.

* **Textual inversion** (Gal et al. 2023): one new token embedding for the frozen open_clip text
  tower (models/text.py).  The placeholder must be a single token of the tokenizer (e.g. "sks");
  wherever it occurs its row of the token-embedding table is replaced by a trainable vector, and
  only that vector trains: the text tower and the family's network stay frozen.  The learned
  vector is saved as diffusers' ``learned_embeds.safetensors`` ({placeholder: vector}).
  ``TextualInversion.active(family)`` routes the family's caption encoding (training and
  sampling) through it for the duration.
* **DreamBooth** (Ruiz et al. 2023): fine-tune on a few images of a new subject under a prompt
  (or label) that names it, optionally with the prior-preservation loss: the same loss on images
  the frozen model generated for the subject's class, weighted by ``prior_weight``, so the class
  is not forgotten.  Full fine-tuning or LoRA (``lora_rank``, models/lora.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.text import TextEmbeddings, get_text_encoder

LEARNED_EMBEDS = "learned_embeds.safetensors"


class TextualInversion(nn.Module):
    """A trainable embedding for ``placeholder`` in the frozen text tower ``spec``."""

    def __init__(self, spec: str, placeholder: str = "sks", init_word: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.spec, self.placeholder = spec, placeholder
        enc = get_text_encoder(spec, device)
        self.token_id = self._single_token(enc, placeholder, "placeholder")
        table = enc.clip.model.token_embedding.weight
        src = self.token_id if init_word is None else self._single_token(enc, init_word, "init_word")
        self.embedding = nn.Parameter(table[src].detach().clone().float())

    @staticmethod
    def _single_token(enc: Any, word: str, what: str) -> int:
        ids = enc.clip.tokenizer([word])[0].tolist()
        body = [i for i in ids[1:] if i != 0][:-1]  # drop start, end and padding
        if len(body) != 1:
            raise ValueError(f"TextualInversion: {what} {word!r} is {len(body)} tokens of {enc.spec!r}'s tokenizer "
                             f"({body}); choose a word that is one token (e.g. 'sks')")
        return int(body[0])

    def encode(self, texts: Sequence[str]) -> TextEmbeddings:
        """TextEncoder's features (models/text.py) with the placeholder's row replaced, differentiably."""
        return encode_with(self.spec, {self.token_id: self.embedding}, texts)

    @contextmanager
    def active(self, family: Any) -> Iterator[None]:
        """The family encodes captions through this embedding meanwhile (training and sampling)."""
        with routed_text(family, self.spec, self.encode):
            yield

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({self.placeholder: self.embedding.detach().cpu().contiguous()}, str(folder / LEARNED_EMBEDS),
                  metadata={"text_encoder": self.spec})
        return folder / LEARNED_EMBEDS

    @classmethod
    def load(cls, path: str | Path, spec: str, device: str | torch.device = "cpu") -> "TextualInversion":
        path = Path(path)
        path = path / LEARNED_EMBEDS if path.is_dir() else path
        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(f"TextualInversion.load: {path} holds {len(tensors)} embeddings, expected one")
        (word, vec), = tensors.items()
        ti = cls(spec, word, device=device)
        if vec.shape != ti.embedding.shape:
            raise ValueError(f"TextualInversion.load: {path}'s embedding has width {vec.shape[-1]}, {spec!r} "
                             f"takes {ti.embedding.shape[-1]}")
        with torch.no_grad():
            ti.embedding.copy_(vec)
        return ti


def encode_with(spec: str, vectors: Mapping[int, Tensor], texts: Sequence[str]) -> TextEmbeddings:
    """The text tower ``spec``'s features of ``texts`` with the token-embedding rows of the token
    ids in ``vectors`` replaced by their vectors (differentiably)."""
    device = next(iter(vectors.values())).device
    enc = get_text_encoder(spec, device)
    m = enc.clip.model
    ids = enc.clip.tokenizer(list(texts)).to(device)
    cast = m.transformer.get_cast_dtype()
    x = m.token_embedding(ids).to(cast)
    for token_id, vec in vectors.items():
        x = torch.where((ids == token_id)[..., None], vec.to(cast), x)
    x = x + m.positional_embedding.to(cast)
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    proj = m.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    if getattr(m, "text_pool_type", "argmax") != "argmax":
        raise ValueError(f"TextualInversion: {spec!r} pools with {m.text_pool_type!r}; only argmax is supported")
    end = ids.argmax(dim=-1)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    pooled = x[torch.arange(ids.shape[0], device=ids.device), end]
    return TextEmbeddings(x.float(), pos <= end[:, None], pooled.float())


@contextmanager
def routed_text(family: Any, spec: str, encode: Any) -> Iterator[None]:
    """Meanwhile the family encodes its captions with ``encode(texts) -> TextEmbeddings``."""
    if family.cfg.conditioning != "text" or str(family.cfg.text_encoder) != spec:
        raise ValueError(f"TextualInversion for {spec!r} needs a family conditioned on that text encoder; "
                         f"{type(family).__name__} has conditioning={family.cfg.conditioning!r} "
                         f"text_encoder={family.cfg.text_encoder!r}")

    def text(captions: Any, n: int, where: str, device: torch.device) -> dict[str, Tensor]:
        if isinstance(captions, str):
            captions = [captions] * n
        if not isinstance(captions, (list, tuple)) or len(captions) != n:
            raise ValueError(f"{where}: captions must be a list of {n} strings")
        emb = encode(captions)
        cond = {"pooled": emb.pooled.to(device)}
        if family.cfg.text_tokens:
            cond["tokens"], cond["token_mask"] = emb.tokens.to(device), emb.mask.to(device)
        return cond

    family.__dict__["_text"] = text
    try:
        yield
    finally:
        family.__dict__.pop("_text", None)


def embedding_file(path: str | Path, error: type[Exception] = ValueError) -> Path:
    """The safetensors file of a textual-inversion embedding given as a file or as a folder holding
    ``learned_embeds.safetensors`` (diffusers' layout); refused with ``error`` when missing or not safetensors."""
    f = Path(path).expanduser()
    f = f / "learned_embeds.safetensors" if f.is_dir() else f
    if not f.is_file():
        raise error(f"embedding {f} does not exist")
    if f.suffix != ".safetensors":
        raise error(f"embedding {f}: only safetensors embeddings are read (learned_embeds.safetensors)")
    return f


def read_embedding(f: Path, error: type[Exception] = ValueError) -> tuple[str, Tensor, dict[str, str]]:
    """``(token, vector, metadata)`` of an embedding file holding one tensor named by its token."""
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        keys, meta = list(sf.keys()), sf.metadata() or {}
        if len(keys) != 1:
            raise error(f"embedding {f} holds {len(keys)} tensors; expected one (token -> vector)")
        return keys[0], sf.get_tensor(keys[0]), meta


class EmbeddingSet:
    """Several textual-inversion embeddings at once (one new token each) for the text tower
    ``spec``: ``(token, vector, where)`` triples; tokens must be distinct single tokens."""

    def __init__(self, spec: str, embeddings: Sequence[tuple[str, Tensor, str]],
                 device: str | torch.device = "cpu") -> None:
        self.spec = spec
        enc = get_text_encoder(spec, device)
        width = enc.clip.model.token_embedding.weight.shape[-1]
        self.vectors: dict[int, Tensor] = {}
        seen: dict[str, str] = {}
        for token, vec, where in embeddings:
            if token in seen:
                raise ValueError(f"embeddings {seen[token]} and {where} both define the token {token!r}")
            seen[token] = where
            if vec.shape != (width,):
                raise ValueError(f"embedding {where}: its vector for {token!r} has shape {list(vec.shape)}; "
                                 f"{spec!r} takes [{width}]")
            self.vectors[TextualInversion._single_token(enc, token, f"the token of {where}")] = \
                vec.detach().float().to(device)

    def encode(self, texts: Sequence[str]) -> TextEmbeddings:
        return encode_with(self.spec, self.vectors, texts)

    @contextmanager
    def active(self, family: Any) -> Iterator[None]:
        with routed_text(family, self.spec, self.encode):
            yield


def _batch(family: Any, images: Tensor, conditioning: Any, idx: Tensor) -> dict[str, Any]:
    key = {"class": "label", "text": "caption"}.get(family.cfg.conditioning)
    batch: dict[str, Any] = {"image": images[idx]}
    if key == "label":
        y = torch.as_tensor(conditioning).reshape(-1)
        batch["label"] = (y.expand(images.shape[0]) if y.numel() == 1 else y)[idx].to(images.device)
    elif key == "caption":
        caps = [conditioning] * images.shape[0] if isinstance(conditioning, str) else list(conditioning)
        batch["caption"] = [caps[int(i)] for i in idx]
    return batch


def train_textual_inversion(family: Any, ti: TextualInversion, images: Tensor, caption: str, steps: int = 100,
                            lr: float = 5e-3, batch_size: int = 4, seed: int = 0) -> list[float]:
    """Optimise only ``ti.embedding`` on the family's own loss for ``images`` under ``caption``
    (which must contain the placeholder).  Returns the losses."""
    if ti.placeholder not in caption.split():
        raise ValueError(f"train_textual_inversion: the caption {caption!r} does not contain {ti.placeholder!r}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([ti.embedding], lr=lr, weight_decay=0.0)
    losses = []
    with ti.active(family):
        for _ in range(steps):
            idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
            loss = family.loss(_batch(family, images, caption, idx), g).losses["model"]
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[ti.embedding])
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def prior_images(family: Any, conditioning: Any, n: int, steps: int | None = None, seed: int = 0,
                 guidance: float = 1.0) -> Tensor:
    """DreamBooth's class images: ``n`` samples of the (frozen, not yet tuned) model."""
    return family.sample(n, conditioning, steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(seed))


def dreambooth(family: Any, images: Tensor, conditioning: Any, steps: int = 100, lr: float = 1e-4,
               batch_size: int = 4, prior: tuple[Tensor, Any] | None = None, prior_weight: float = 1.0,
               lora_rank: int | None = None, lora_targets: Any = None, seed: int = 0) -> list[float]:
    """Fine-tune ``family`` on the subject ``images`` under ``conditioning`` (labels or a caption);
    with ``prior=(class_images, class_conditioning)`` each step adds ``prior_weight`` times the loss
    on a batch of them.  ``lora_rank``: train a LoRA adapter instead of every weight (on
    ``lora_targets``, models/lora.py's default or "all")."""
    if prior_weight < 0:
        raise ValueError(f"dreambooth: prior_weight must be >= 0, got {prior_weight}")
    if lora_rank is not None:
        from models.lora import add_lora

        params = add_lora(family, lora_rank, targets=lora_targets)
    else:
        params = [p for p in family.net.parameters()]
        for p in params:
            p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    family.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        loss = family.loss(_batch(family, images, conditioning, idx), g).losses["model"]
        if prior is not None and prior_weight > 0:
            p_img, p_cond = prior
            pidx = torch.randint(0, p_img.shape[0], (batch_size,), generator=g)
            loss = loss + prior_weight * family.loss(_batch(family, p_img, p_cond, pidx), g).losses["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        opt.step()
        losses.append(float(loss.detach()))
    family.eval()
    return losses


def denoising_loss(family: Any, images: Tensor, conditioning: Any, repeats: int = 8, seed: int = 123) -> float:
    """The family's mean training loss on ``images`` with fixed noise draws (lower = better fit)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(images.shape[0])
    was = family.training
    family.eval()
    with torch.no_grad():
        vals = [float(family.loss(_batch(family, images, conditioning, idx), g).losses["model"]) for _ in range(repeats)]
    family.train(was)
    return sum(vals) / len(vals)


# ----------------------------------------------------------------------------- as a trainer run


from typing import ClassVar, Literal  # noqa: E402

from pydantic import Field  # noqa: E402

from models.base import Family, FamilyConfig, LossOut  # noqa: E402
from models.samplers import SampleResult  # noqa: E402

Prompt = str | int | None


class PersonalizeConfig(FamilyConfig):
    base: str = Field("", description="Checkpoint folder of the base run (or 'run:<id>' via the run layer)")
    method: Literal["dreambooth", "lora", "textual_inversion"] = Field(
        "lora", description="dreambooth: every weight of the base's net trains; lora: a LoRA adapter of lora_rank "
        "(models/lora.py); textual_inversion: only the placeholder's token embedding (text models)")
    prompt: Prompt = Field(None, description="What every training image is conditioned on: the subject's caption "
                           "(text; must hold the placeholder for textual inversion) or label (class); None: the "
                           "dataset's own captions / labels")
    subject: str | None = Field(None, description="The world shape the subject is (the control benchmark detects "
                                "it in images prompted with `prompt`); None: not scored")
    lora_rank: int = Field(4, ge=1, le=1024, description="lora: adapter rank")
    lora_alpha: float | None = Field(None, gt=0, description="lora: scale numerator (None = the rank)")
    lora_targets: Literal["default", "all"] = Field("default", description="lora: attention / MLP projections, or "
                                                    "every linear and conv")
    placeholder: str = Field("sks", min_length=1, description="textual_inversion: the new token (one token)")
    init_word: str | None = Field(None, description="textual_inversion: start from this word's embedding")
    prior_prompt: Prompt = Field(None, description="DreamBooth prior preservation: the class prompt / label the "
                                 "base's own images are generated for (None: no prior preservation)")
    prior_count: int = Field(16, ge=1, le=10_000, description="prior images generated by the base before training")
    prior_weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of the prior-preservation loss")
    prior_steps: int | None = Field(None, ge=1, le=1000, description="sampler steps of the prior images")
    prior_seed: int = Field(0, ge=0, description="seed of the prior images")


class Personalize(Family):
    """LoRA / DreamBooth / textual inversion of a base run as a family of the generic trainer: the
    base's network (a copy, started from its weights) trains on the subject images of the run's
    dataset under ``prompt``, with prior preservation on images the frozen base generates for
    ``prior_prompt``; sampling is the base family's.  Its checkpoint holds the whole network (with
    the LoRA layers, or the embedding) and samples without the base."""

    name: ClassVar[str] = "personalize"
    Config: ClassVar[type[FamilyConfig]] = PersonalizeConfig
    base_fields: ClassVar[tuple[str, ...]] = ("net", "net_size", "net_overrides", "image_size", "channels", "data",
                                              "conditioning", "num_classes", "text_encoder", "text_tokens")
    samplers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm", "heun", "euler", "dpmpp_2m", "consistency")
    default_sampler: ClassVar[str] = "ddim"

    cfg: PersonalizeConfig

    def __init__(self, cfg: PersonalizeConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        from models.checkpoint import load_family
        from models.teacher import TeacherError, same_fields

        c = self.cfg
        if not c.base:
            raise TeacherError("personalize: config field base (the base run's checkpoint folder) is empty")
        inner = load_family(c.base)
        if not isinstance(getattr(inner, "net", None), nn.Module):
            raise TeacherError(f"personalize: the base {c.base} is a {inner.name!r} model without a denoiser net")
        same_fields(c, inner.cfg, self.base_fields, "personalize")
        cond = inner.cfg.conditioning
        for field in ("prompt", "prior_prompt"):
            v = getattr(c, field)
            if v is None:
                continue
            if cond == "none":
                raise TeacherError(f"personalize: {field} {v!r} given but the base is unconditional")
            if cond == "text" and not isinstance(v, str) or cond == "class" and not (isinstance(v, int)
                                                                                   and 0 <= v < inner.cfg.num_classes):
                want = "a caption" if cond == "text" else f"a label in [0, {inner.cfg.num_classes})"
                raise TeacherError(f"personalize: {field} must be {want} for this {cond}-conditioned base, got {v!r}")
        inner.train()
        self.ti = None
        if c.method == "textual_inversion":
            if cond != "text":
                raise TeacherError(f"personalize: textual inversion needs a text-conditioned base; it is {cond!r}")
            if not isinstance(c.prompt, str) or c.placeholder not in c.prompt.split():
                raise TeacherError(f"personalize: textual inversion trains the embedding of {c.placeholder!r}: "
                                   f"prompt must contain it as a word, got {c.prompt!r}")
            inner.requires_grad_(False)
            self.ti = TextualInversion(str(inner.cfg.text_encoder), c.placeholder, c.init_word)
            params = [self.ti.embedding]
        elif c.method == "lora":
            from models.lora import add_lora

            params = add_lora(inner, c.lora_rank, c.lora_alpha, c.lora_targets)
        else:
            params = list(inner.net.parameters())
            for p in params:
                p.requires_grad_(True)
        self.inner = inner
        self._params = params
        self.trainable_fraction = sum(p.numel() for p in params) / max(1, sum(p.numel() for p in inner.parameters()))
        self.samplers, self.default_sampler, self.default_steps = inner.samplers, inner.default_sampler, inner.default_steps
        self.sampler_options = dict(inner.sampler_options)

    @property
    def net(self) -> nn.Module:  # type: ignore[override]
        return self.inner.net

    def optimizers_spec(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self._params)}

    def _active(self) -> Any:
        from contextlib import nullcontext

        return self.ti.active(self.inner) if self.ti is not None else nullcontext()

    def _prompted(self, batch: Mapping[str, Any], prompt: Prompt) -> dict[str, Any]:
        out = dict(batch)
        if prompt is None:
            return out
        n = int(self.check_images(batch).shape[0])
        if self.inner.cfg.conditioning == "text":
            out["caption"] = [prompt] * n
        else:
            out["label"] = torch.full((n,), int(prompt), dtype=torch.long, device=out["image"].device)
        return out

    def _prior(self) -> Tensor:
        """The prior images: the frozen base's samples for prior_prompt (made once, the same on resume)."""
        got = self.__dict__.get("_prior_images")
        if got is None:
            from models.checkpoint import load_family

            c = self.cfg
            base = load_family(c.base, device=self.device)
            cond = [c.prior_prompt] * c.prior_count if isinstance(c.prior_prompt, str) else \
                torch.full((c.prior_count,), int(c.prior_prompt), dtype=torch.long)
            with torch.no_grad():
                got = base.sample(c.prior_count, cond, steps=c.prior_steps,
                                  generator=torch.Generator(self.device).manual_seed(c.prior_seed)).detach()
            self.__dict__["_prior_images"] = got
        return got

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        c = self.cfg
        with self._active():
            out = self.inner.loss(self._prompted(batch, c.prompt), generator)
            if c.prior_prompt is None or c.prior_weight == 0 or c.method == "textual_inversion":
                return out
            prior = self._prior()
            n = int(self.check_images(batch).shape[0])
            idx = torch.randint(0, prior.shape[0], (n,), generator=generator).to(prior.device)
            p_out = self.inner.loss(self._prompted({"image": prior[idx]}, c.prior_prompt), generator)
        total = out.losses["model"] + c.prior_weight * p_out.losses["model"]
        logs = {**out.logs, "loss": float(total.detach()), "loss_subject": float(out.losses["model"].detach()),
                "loss_prior": float(p_out.losses["model"].detach())}
        return LossOut({"model": total}, logs)

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        with self._active():
            return self.inner.sample_result(n, conditioning, sampler, steps, guidance, negative, generator, x_T,
                                            **options)

    def run_sampler(self, net_fn: Any, x_T: Tensor, sampler: str, steps: int,
                    generator: torch.Generator | None, options: dict[str, Any]) -> SampleResult:
        return self.inner.run_sampler(net_fn, x_T, sampler, steps, generator, options)
