"""The evaluation request (``EvalRequest``, its ``RewardModel`` entries) and summary (``EvalSummary``):
plain pydantic and typed dicts, no torch.

The evaluate, benchmark and pipeline flows name the request in their signatures and validate it
before any work, so importing this module imports neither torch nor the metric code;
``imagegen.evaluate.run`` re-exports all three and hashes this module's source with its own into
every evaluation id.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.determinism import DEFAULT_THREADS
from imagegen.evaluate.metrics import ALL_METRICS, Metric


class RewardModel(BaseModel):
    """One reward / aesthetic model of ``EvalRequest.reward_models`` (weights by path, safetensors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["aesthetic", "hpsv2", "pickscore", "imagereward"]
    path: str = Field(description="aesthetic: the head .safetensors; hpsv2: unused ('' ) - the CLIP is `clip`; "
                      "pickscore: the CLIPModel folder; imagereward: the converted folder")
    clip: str | None = Field(None, description="aesthetic / hpsv2: the open_clip spec (published: ViT-L-14:openai / "
                             "ViT-H-14 fine-tuned local-dir)")
    processor: str | None = Field(None, description="pickscore: the processor folder (None = the model's)")


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str | None = Field(None, description="Training or distillation run id (or unique prefix) to evaluate")
    folder: str | None = Field(None, description="Or: a folder of images (PNG/JPEG) to evaluate as they are")
    model: str | None = Field(None, description="Or: a diffusers pipeline, 'diffusers:PATH_OR_REPO_ID[@REVISION]'")
    resolution: int | None = Field(None, ge=8, le=8192, description="diffusers models: image side (None = its default)")
    height: int | None = Field(None, ge=8, le=8192, description="runs of any-size families (DDPM, EDM, flow) and "
                               "diffusers models: generate at this height in pixels, e.g. an aspect bucket's (None = "
                               "the run's / pipeline's size)")
    width: int | None = Field(None, ge=8, le=8192, description="runs of any-size families and diffusers models: "
                              "generate at this width in pixels (None = the run's / pipeline's size)")
    negative: str | None = Field(None, description="diffusers models: negative prompt for every image")
    metrics: tuple[Metric, ...] = Field(ALL_METRICS, min_length=1,
                                        description="Metrics to compute")
    sampler: str | None = Field(None, description="Sampler (None = the family's default)")
    steps: int | None = Field(None, ge=1, le=10_000, description="Sampler steps (None = the family's default)")
    guidance: float = Field(1.0, ge=0.0, le=100.0, description="Classifier-free guidance scale (1 = none)")
    seed: int = Field(0, ge=0, le=2**62, description="Seeds the noise of every generated image")
    n_samples: int = Field(1000, ge=2, le=1_000_000, description="Images generated for FID/KID/CLIPScore")
    reference: str | None = Field(None, description="Reference dataset (name or id); default: the run's dataset")
    reference_n: int | None = Field(None, ge=2, description="Reference images (None = all)")
    reference_stats: str | None = Field(None, description="FID against imported reference statistics (name or id "
                                        "of `imagegen import fid-stats FILE.npz`) instead of a reference dataset")
    extractor: str = Field("auto", description="'auto', 'inception', or an open_clip spec / 'world' (FD-CLIP)")
    fid_mode: Literal["clean", "legacy_pytorch", "legacy_tensorflow"] = Field("clean", description="clean-fid mode")
    kid_subsets: int = Field(100, ge=1, le=10_000, description="KID subsets")
    kid_subset_size: int = Field(1000, ge=2, description="KID subset size (capped at the sample counts)")
    clip_model: str = Field("auto", description="CLIPScore model: 'auto' (world -> the reference CLIP, else "
                            "ViT-B-32:openai), 'world', or an open_clip spec")
    geneval_prompts: str = Field("world", description="'world' or a GenEval metadata .jsonl file")
    geneval_per_prompt: int = Field(4, ge=1, le=64, description="Images per GenEval prompt (official: 4)")
    geneval_max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts (None = all)")
    detector: str = Field("world", description="'world', 'torchvision:/path/to/maskrcnn_weights' or "
                          "'owlv2:<hub name or save_pretrained folder>' (open-vocabulary, transformers)")
    dinov2_model: str = Field("facebook/dinov2-large", description="fd_dinov2 / prdc: DINOv2 hub name or local "
                              "save_pretrained folder (ViT-L/14 is what Stein et al. 2023 recommend)")
    prdc_features: str = Field("dinov2", description="prdc on these features: 'dinov2' (dinov2_model) or 'fd' "
                               "(the FID/FD extractor of `extractor`)")
    prdc_k: int = Field(3, ge=1, le=100, description="k of the k-NN radii (Kynkäänniemi et al. 2019: 3)")
    cmmd_clip: str = Field("auto", description="CMMD's CLIP: 'auto' (world -> the reference CLIP, else "
                           "ViT-L-14-336:openai as the paper), 'world', or an open_clip spec")
    is_splits: int = Field(10, ge=1, le=1000, description="Inception Score splits")
    reward_models: tuple[RewardModel, ...] = Field((), description="reward / aesthetic models of the 'reward' metric")
    vqa_model: str | None = Field(None, description="dpg: a transformers image-text-to-text model (name or folder)")
    vqa_mode: Literal["generate", "yes_no"] = Field("generate", description="dpg: how the VQA model answers")
    dpg_questions: str | None = Field(None, description="dpg: the DPG-Bench question csv (dpg_bench.csv format)")
    dpg_per_prompt: int = Field(1, ge=1, le=16, description="dpg: images generated per prompt")
    dpg_max_prompts: int | None = Field(None, ge=1, description="dpg: use only the first N prompts")
    control_scenes: int = Field(64, ge=2, le=100_000, description="control: held-out world scenes the ControlNet / "
                                "inpainting / SDEdit scores are measured on (imagegen/evaluate/control.py)")
    n_resamples: int = Field(100, ge=0, le=100_000, description="Bootstrap resamples of every metric's interval "
                             "(0 = no intervals)")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence of the intervals")
    n_seeds: int = Field(1, ge=1, le=64, description="Generate the set n_seeds times with independent seeds "
                         "(seed, seed+1, ...) and report mean +- std over them (runs only)")
    batch_size: int = Field(64, ge=1, le=4096, description="Generation and feature batch size")
    threads: int = Field(DEFAULT_THREADS, ge=1, le=1024, description="torch intra-op CPU threads of generation and "
                         "features (CPU float reductions split by it, so it is part of the evaluation id; never "
                         "taken from the machine)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where generation and features run")

    @model_validator(mode="after")
    def _one_source(self) -> "EvalRequest":
        if sum(x is not None for x in (self.run, self.folder, self.model)) != 1:
            raise ValueError("give exactly one of run (a run id), model (diffusers:...) or folder (a folder of images)")
        if self.model is not None:
            from models.hf_diffusers import parse_spec

            parse_spec(self.model)
        elif self.resolution is not None or self.negative is not None:
            raise ValueError("resolution= and negative= apply to diffusers models (model='diffusers:...')")
        if (self.height is not None or self.width is not None) and self.folder is not None:
            raise ValueError("height/width apply to runs (run=RUN) of any-size families and to diffusers models; a "
                             "folder is evaluated at its images' size")
        if (self.height is not None or self.width is not None) and self.resolution is not None:
            raise ValueError("give resolution= (a square side) or height=/width=, not both")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics has duplicates: {list(self.metrics)}")
        if self.n_seeds > 1 and self.folder is not None:
            raise ValueError("n_seeds > 1 regenerates the set with other seeds: it needs run=, not folder=")
        if "reward" in self.metrics and not self.reward_models:
            raise ValueError("metric 'reward' needs reward_models (kind + weights path of each)")
        if "dpg" in self.metrics and (self.vqa_model is None or self.dpg_questions is None):
            raise ValueError("metric 'dpg' needs vqa_model (a transformers image-text-to-text model) and "
                             "dpg_questions (a DPG-Bench csv)")
        if self.prdc_features not in ("dinov2", "fd"):
            raise ValueError(f"prdc_features must be 'dinov2' or 'fd', got {self.prdc_features!r}")
        return self


class EvalSummary(TypedDict):
    """What :func:`evaluate` returns: the flows, the benchmark, the leaderboard and the reports read
    it (``card.json`` of the evaluation holds it too, with the request and the identity)."""

    eval_id: str
    path: str
    metrics: dict[str, float]       # result name (FID, FD-..., KID, CLIPScore (...), GenEval ...) -> value
    skipped: dict[str, str]         # requested metric -> why it was not computed
    run_id: str | None
    model: dict[str, Any] | None    # a diffusers model's identity (spec, source, revision, pipeline, files_sha256)
    family: str | None
    sampler: str | None
    steps: int | None
    nfe: int | None
    guidance: float
    n_samples: int
    seconds: float
    metrics_file: str | None
    reused: bool
    intervals: NotRequired[dict[str, list[float]]]  # result name -> [low, high] (bootstrap, or t over seeds)
    flags: NotRequired[dict[str, list[str]]]        # result name -> why its sample count is too small
    protocol: NotRequired[dict[str, Any]]           # what makes two evaluations comparable (protocol card)
    n_seeds: NotRequired[int]
