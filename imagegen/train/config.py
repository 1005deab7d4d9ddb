"""The training configuration (``TrainConfig``) and request (``TrainRequest``): plain pydantic, no torch.

The flows, the command line and the pipeline request name these in their signatures and validate
them before any work; importing this module imports neither torch nor the model families (a
config's validators import the family registry only when a config is validated).  The trainer
(``imagegen.train.trainer``) and the run layer (``imagegen.train.runs``) re-export both, and the
run id hashes this module's source with the trainer's (``imagegen.train.runs.train_code_version``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from imagegen.checks import AllProblems, Problems
from imagegen.determinism import DEFAULT_THREADS

# Fields that may change between a run and its resumption without changing the trajectory.
RESUMABLE_CHANGES = ("log_every", "ckpt_every", "keep_checkpoints", "sample_every", "sample_count",
                     "sample_steps", "sample_sampler", "sample_guidance", "sample_prompts", "max_bad_steps", "device")


class TrainConfig(AllProblems):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = Field(description="Registered model family name (models/registry.py)")
    model: dict[str, Any] = Field(default_factory=dict, description="The family's config fields")
    steps: int = Field(ge=1, le=100_000_000, description="Total optimizer steps of the run")
    batch_size: int = Field(ge=1, le=1_048_576, description="Global batch: samples per optimizer step, all "
                            "processes and micro-batches together")
    micro_batches: int = Field(1, ge=1, le=4096, description="Slots the global batch is split into; each reads "
                               "its own shard stream and noise. torchrun processes share the slots, the rest "
                               "is gradient accumulation, so the run is the same on 1 or N processes")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Peak learning rate of every AdamW")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0.0, le=1.0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="AdamW decoupled weight decay")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warmup from lr/warmup_steps to lr")
    schedule: Literal["cosine", "constant"] = Field("constant", description="LR after warmup")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm per optimizer (0 = no clipping)")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="EMA decay of the weights (0 = no EMA)")
    ema_warmup: bool = Field(True, description="EMA decay min(ema_decay, (1+n)/(10+n)) at step n, so a short "
                             "run's EMA does not keep a share ema_decay^n of the random init")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (CUDA only; CPU runs fp32)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    seed: int = Field(0, ge=0, le=2**62, description="Seeds weights, data order and loss noise")
    label_field: str | None = Field(None, description="Class conditioning: the samples' .json field holding "
                                    "the class name (dotted path for nested fields)")
    label_keywords: tuple[str, ...] = Field((), description="Class conditioning: the class of a sample is the "
                                            "keyword found first in its caption (whole words, any case, plurals in -s/-es)")
    classes: tuple[str, ...] = Field((), description="Class names in label order (label_keywords: the keywords; "
                                     "label_field: filled from the dataset manifest when empty)")
    caption_drop_words: tuple[str, ...] = Field((), description="Text conditioning: attribute words (e.g. the "
                                                "colour names) that caption_word_dropout removes from a caption")
    caption_word_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Text conditioning: probability that a "
                                        "training caption loses every caption_drop_words word it holds (whole "
                                        "words, any case; 'a'/'an' fixed), so prompts that name fewer attributes "
                                        "stay in distribution; drawn per (seed, step, slot, sample), independent "
                                        "of the loss noise and of model.cond_dropout (the empty caption for CFG)")
    log_every: int = Field(1, ge=1, description="Steps between metric rows (skipped steps always logged)")
    ckpt_every: int = Field(1000, ge=1, description="Steps between checkpoints (and at the end)")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Newest checkpoints kept")
    sample_every: int = Field(0, ge=0, description="Steps between sample grids (0 = only at the end)")
    sample_count: int = Field(8, ge=1, le=256, description="Images per sample grid")
    sample_steps: int | None = Field(None, ge=1, le=10_000, description="Sampler steps (None = family default)")
    sample_guidance: float = Field(1.0, ge=0.0, le=100.0, description="CFG scale of the sample grids "
                                   "(conditional models; 1 = no guidance)")
    sample_sampler: str | None = Field(None, description="Sampler of the sample grids (None = family default)")
    sample_prompts: tuple[str, ...] = Field((), description="Captions of the sample grids (text conditioning; "
                                            "cycled; empty = the null prompt)")
    max_bad_steps: int = Field(10, ge=0, description="Non-finite steps tolerated (skipped) before aborting")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader workers per micro-batch slot")
    epoch_batches: int = Field(1000, ge=1, description="Batches per slot per data epoch (the resampling unit)")
    shuffle_buffer: int = Field(1000, ge=0, description="Sample shuffle buffer of the loader")
    threads: int = Field(DEFAULT_THREADS, ge=1, le=1024, description="torch intra-op CPU threads of every "
                         "process of the run (part of the run id: CPU float reductions round differently at "
                         "another count); never taken from the machine")
    aspect_buckets: float = Field(0.0, ge=0.0, le=8.0, description="0: every image resized and center-cropped "
                                  "to the square image_size; r >= 1: aspect-ratio buckets of about image_size^2 "
                                  "pixels up to r:1 either way (imagegen.loader.aspect_buckets, sides multiples of "
                                  "the denoiser's patch/downsampling), each batch from one bucket; needs a family "
                                  "that trains at any size (flow, ddpm, edm, ict; not with REPA)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must each lie in [0, 1), got {v}")
        return v

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        from models.registry import get_family  # torch: only when a config is validated

        get_family(v)  # UnknownFamilyError is a ValueError: reported by pydantic
        return v

    @model_validator(mode="before")
    @classmethod
    def _class_count(cls, data: Any) -> Any:
        # a class-conditioned model's num_classes comes from the class list when not given
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            model = dict(data["model"])
            classes = tuple(data.get("classes") or data.get("label_keywords") or ())
            if model.get("conditioning") == "class" and "num_classes" not in model:
                if classes:
                    model["num_classes"] = len(classes)
                elif data.get("label_field"):
                    # classes (and their number) come from the dataset manifest (train/runs.py);
                    # until then the family config needs a valid count
                    model["num_classes"] = 1
            data = {**data, "model": model}
        return data

    @field_validator("model")
    @classmethod
    def _normalise_model(cls, model: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # the family config in canonical form, so checkpoints and run ids compare like with like;
        # its errors are reported under train.model next to every other field's
        family = info.data.get("family")
        if not isinstance(family, str):
            return model  # the family is invalid: reported on its own
        from models.registry import get_family

        return get_family(family).Config(**model).model_dump(mode="json")

    def problems(self, p: Problems) -> None:
        from models.registry import get_family

        super().problems(p)
        if p.can("warmup_steps", "steps") and self.warmup_steps > self.steps:
            p.add(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        if p.can("batch_size", "micro_batches") and self.batch_size % self.micro_batches:
            p.add(f"batch_size={self.batch_size} must be a multiple of micro_batches={self.micro_batches}")
        conditioning = self.model.get("conditioning", "none")
        labels = ("model", "label_field", "label_keywords", "classes")
        if not p.can(*labels):
            pass
        elif conditioning != "class":
            if self.label_field or self.label_keywords or self.classes:
                p.add(f"label_field/label_keywords/classes are for class conditioning; the model has "
                      f"conditioning={conditioning!r}")
        else:
            if bool(self.label_field) == bool(self.label_keywords):
                p.add("conditioning='class' needs exactly one label source: label_field (a .json "
                      "field of the samples) or label_keywords (words looked up in the captions)")
            if self.label_keywords:
                words = [w.strip().lower() for w in self.label_keywords]
                if any(not w for w in words) or len(set(words)) != len(words):
                    p.add(f"label_keywords must be distinct non-empty words, got {list(self.label_keywords)}")
                if self.classes and tuple(self.classes) != tuple(self.label_keywords):
                    p.add("classes must be empty or equal label_keywords when classes come from keywords")
            if len(set(self.classes)) != len(self.classes):
                p.add(f"classes has duplicates: {list(self.classes)}")
            n = len(self.classes or self.label_keywords)
            if n and self.model.get("num_classes") != n:
                p.add(f"model.num_classes={self.model.get('num_classes')} but there are {n} classes")
        if p.can("caption_drop_words", "caption_word_dropout", "model"):
            words = [w.strip().lower() for w in self.caption_drop_words]
            if self.caption_word_dropout and not words:
                p.add(f"caption_word_dropout={self.caption_word_dropout} needs caption_drop_words (the words to drop)")
            if words and conditioning != "text":
                p.add(f"caption_drop_words/caption_word_dropout are for text conditioning; the model has "
                      f"conditioning={conditioning!r}")
            if any(not w or not re.fullmatch(r"[\w' -]+", w) for w in words) or len(set(words)) != len(words):
                p.add(f"caption_drop_words must be distinct non-empty words, got {list(self.caption_drop_words)}")
        if p.can("aspect_buckets", "model", "family") and self.aspect_buckets:
            fam_cls = get_family(self.family)
            if self.aspect_buckets < 1.0:
                p.add(f"aspect_buckets must be 0 (square crops) or a max aspect ratio >= 1, got {self.aspect_buckets}")
            if not fam_cls.any_size or self.model.get("repa"):
                p.add(f"aspect_buckets needs a family that trains at any image size; {self.family!r}"
                      f"{' with REPA' if self.model.get('repa') else ''} takes only its square image_size")
        samplers = get_family(self.family).samplers
        if p.can("sample_sampler") and self.sample_sampler is not None and self.sample_sampler not in samplers:
            p.add(f"unknown sampler {self.sample_sampler!r} for family {self.family!r}; it has {list(samplers)}")
        if p.can("sample_prompts", "model") and self.sample_prompts and conditioning != "text":
            p.add("sample_prompts are for text conditioning")
        if p.can("sample_guidance", "model") and self.sample_guidance != 1.0 and conditioning == "none":
            p.add(f"sample_guidance={self.sample_guidance} needs a conditional model "
                  "(conditioning='none' samples without guidance: use 1.0)")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.micro_batches

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.classes or self.label_keywords)


class TrainRequest(BaseModel):
    """What a flow run or ``imagegen train`` asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(min_length=1, description="Dataset name or id (or unique id prefix) in the registry")
    train: TrainConfig = Field(description="The training configuration")
    nproc: int = Field(1, ge=1, le=1024, description="Processes (GPUs) on this machine; >1 launches torchrun")
    timeout_s: float | None = Field(None, gt=0, description="Kill the training (all processes) after this long")
