"""The distillation request (``DistillRequest``): plain pydantic, no torch.

The distill and pipeline flows name it in their signatures and validate it before any work, so
importing this module imports neither torch nor the trainer; ``imagegen.distill`` re-exports it
and hashes this module's source with its own into the ids of the reflow pairs, the students' NFE
report and the LCM-LoRA export.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.determinism import DEFAULT_THREADS
from models.teacher import Method


class DistillRequest(BaseModel):
    """A distillation: which teacher, which method, and how long each student trains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: str = Field(min_length=1, description="Teacher training run id (or unique prefix) in the run registry; "
                         "lcm_lora: a diffusers pipeline, diffusers:PATH_OR_REPO_ID[@REVISION]")
    method: Method = Field(description="progressive (DDPM v-pred teacher), reflow (flow teacher), consistency (EDM), "
                           "dmd (flow teacher), ict (consistency training; the EDM run is the reference), "
                           "lcm_lora (a diffusers UNet pipeline into a LoRA adapter)")
    dataset: str | None = Field(None, description="lcm_lora: the dataset (name or id) of images and captions to "
                                "distil on (a run teacher brings its own)")
    steps: int = Field(1000, ge=1, le=10_000_000, description="Training steps per student (per round)")
    lr: float | None = Field(None, gt=0, le=1.0, description="Student LR (None = the teacher's)")
    batch_size: int | None = Field(None, ge=1, description="Global batch (None = the teacher's)")
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0, description="Student EMA (None = the teacher's)")
    warmup_steps: int = Field(0, ge=0, description="Student LR warmup")
    # progressive
    start_steps: int = Field(64, ge=2, le=4096, description="progressive: sampling steps of the teacher run")
    target_steps: int = Field(4, ge=1, le=2048, description="progressive: steps of the last student")
    # reflow
    pairs: int = Field(2000, ge=1, le=100_000_000, description="reflow: couplings drawn from the teacher")
    pair_steps: int = Field(50, ge=1, le=10_000, description="reflow: teacher ODE steps per coupling")
    pair_sampler: Literal["euler", "heun"] = Field("heun", description="reflow: teacher ODE sampler")
    pair_guidance: float | None = Field(None, ge=0, le=50, description="reflow: teacher CFG (None = its sample_guidance)")
    student_steps: int = Field(1, ge=1, le=1000, description="reflow/consistency/ict: default sampling steps of the "
                               "student (dmd: always 1)")
    # consistency
    levels: int = Field(18, ge=2, le=4096, description="consistency: Karras levels N")
    target_ema: float = Field(0.95, ge=0.0, lt=1.0, description="consistency: target-network EMA decay")
    distance: Literal["l2", "pseudo_huber"] = Field("pseudo_huber", description="consistency/ict: loss metric")
    teacher_guidance: float = Field(1.0, ge=0, le=50, description="consistency: CFG scale distilled in (LCM); dmd: "
                                    "CFG scale of the teacher's (real) score")
    # dmd
    regression_weight: float = Field(0.25, ge=0.0, le=100.0, description="dmd: weight of the regression loss on "
                                     "the teacher pairs (paper: 0.25)")
    # lcm_lora
    lora_rank: int = Field(64, ge=1, le=1024, description="lcm_lora: LoRA rank (LCM-LoRA: 64)")
    lora_targets: tuple[str, ...] | None = Field(None, description="lcm_lora: UNet module suffixes (None = convs, "
                                                 "attention and feed-forward: models.lcm_lora.LCM_TARGETS)")
    ddim_steps: int = Field(50, ge=2, le=1000, description="lcm_lora: N of the skipping-step grid (k = T / N)")
    teacher_guidance_max: float | None = Field(None, ge=0, le=50, description="lcm_lora: w ~ U[teacher_guidance, "
                                               "this] (None = teacher_guidance alone)")
    guidance_embedding: int = Field(0, ge=0, le=4096, description="lcm_lora: w-embedding size (LCM: 256; 0 = "
                                    "guidance baked in, as LCM-LoRA)")
    target: Literal["ema", "stopgrad"] = Field("ema", description="lcm_lora: EMA target (decay target_ema) or the "
                                               "student without gradient (consistency: always EMA)")
    image_size: int | None = Field(None, ge=8, le=4096, description="lcm_lora: training resolution (None = the "
                                   "pipeline's default)")
    seed: int = Field(0, ge=0, le=2**62, description="Seeds pairs and report noise")
    nproc: int = Field(1, ge=1, le=1024, description="Processes per student run (torchrun when > 1)")
    threads: int = Field(DEFAULT_THREADS, ge=1, le=1024, description="torch intra-op CPU threads of the reflow pairs "
                         "and the NFE report (their floats depend on it: hashed into the pairs' and the report's "
                         "ids; the student runs train on their own train.threads)")
    report_nfe: tuple[int, ...] = Field((1, 2, 4, 8), description="NFEs of the report grids")
    report_count: int = Field(8, ge=1, le=64, description="Images per report row")

    @model_validator(mode="after")
    def _check(self) -> "DistillRequest":
        if self.method == "progressive":
            s, t = self.start_steps, self.target_steps
            if t >= s or s % t or (s // t) & (s // t - 1):
                raise ValueError(f"progressive distillation halves the steps each round: start_steps={s} must be "
                                 f"target_steps={t} times a power of two (e.g. 64 -> 4)")
        return self

    def guidance(self, conditional: bool, teacher_sample_guidance: float) -> tuple[float, float]:
        """(the teacher's CFG scale the student learned from, the student's own CFG scale).  Reflow
        pairs and consistency targets have the teacher's guidance distilled in, so those students
        sample without CFG (a second CFG on top would over-guide); a progressive student samples
        with the teacher's."""
        if not conditional:
            return 1.0, 1.0
        learned = {"reflow": self.pair_guidance if self.pair_guidance is not None else teacher_sample_guidance,
                   "consistency": self.teacher_guidance, "dmd": self.teacher_guidance, "lcm_lora": self.teacher_guidance,
                   "ict": 1.0}.get(self.method, teacher_sample_guidance)
        return float(learned), float(learned) if self.method == "progressive" else 1.0

    @model_validator(mode="after")
    def _check_lcm(self) -> "DistillRequest":
        if (self.method == "lcm_lora") != self.teacher.startswith("diffusers:"):  # models.hf_diffusers.PREFIX
            raise ValueError("a diffusers pipeline teacher (diffusers:PATH) is distilled by method lcm_lora, and "
                             f"lcm_lora distils a diffusers pipeline; got method {self.method!r} with teacher "
                             f"{self.teacher!r}")
        if self.method == "lcm_lora" and not self.dataset:
            raise ValueError("lcm_lora distils on images and captions: set dataset (a registered dataset name or id)")
        if self.teacher_guidance_max is not None and self.teacher_guidance_max < self.teacher_guidance:
            raise ValueError(f"teacher_guidance_max={self.teacher_guidance_max} < teacher_guidance={self.teacher_guidance}")
        return self

    def rounds(self) -> list[int]:
        """Student step counts, one training run each."""
        if self.method == "dmd":
            return [1]
        if self.method != "progressive":
            return [self.student_steps]
        out, n = [], self.start_steps
        while n > self.target_steps:
            n //= 2
            out.append(n)
        return out
