"""LCM-LoRA distillation of a diffusers pipeline (models/lcm_lora.py, ``imagegen distill --method
lcm_lora``) on a tiny pipeline whose UNet was trained briefly on real latents (so it has an ODE to
distil), and the base identity of diffusers-based runs (their id hashes the pipeline's files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def teacher_pipe(tmp_path_factory) -> Path:
    from _diffusers_tiny import trained_tiny_sd_pipeline

    return trained_tiny_sd_pipeline(tmp_path_factory.mktemp("lcm-teacher") / "pipe", steps=150)


def test_lcm_grid_and_scalings_are_the_lcm_schedulers():
    from diffusers import LCMScheduler

    from models.lcm_lora import lcm_timesteps

    for steps in (1, 2, 4, 8):
        s = LCMScheduler(original_inference_steps=50)
        s.set_timesteps(steps)
        assert lcm_timesteps(steps, 50, 1000) == s.timesteps.tolist()
    assert lcm_timesteps(4, 50, 1000) == [999, 759, 499, 259]  # starts at T - 1, not at 751 as DDIM's "leading"


def test_lcm_request_refusals(tmp_path):
    from pydantic import ValidationError

    from imagegen.distill import DistillRequest

    with pytest.raises(ValidationError, match="lcm_lora distils a diffusers pipeline"):
        DistillRequest(teacher="abc123", method="lcm_lora", dataset="d")
    with pytest.raises(ValidationError, match="is distilled by method lcm_lora"):
        DistillRequest(teacher="diffusers:/x", method="consistency")
    with pytest.raises(ValidationError, match="set dataset"):
        DistillRequest(teacher="diffusers:/x", method="lcm_lora")
    with pytest.raises(ValidationError, match="teacher_guidance_max"):
        DistillRequest(teacher="diffusers:/x", method="lcm_lora", dataset="d", teacher_guidance=3, teacher_guidance_max=2)


@pytest.mark.slow
def test_lcm_lora_distill_cli_end_to_end(teacher_pipe, tmp_path, capsys):
    """``imagegen distill --teacher diffusers:PATH --dataset D``: the student run trains only its adapter;
    the exported adapter loads with load_lora_weights and, under diffusers' LCMScheduler, gives the
    family's own LCM samples; at 4 steps the student is closer to the teacher at 50 steps than the
    teacher itself at 4 (MSE on the same noise), and distillation moved it (1 step closer than the
    adapters-off student)."""
    from _helpers import register_world_dataset
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from imagegen.cli import main
    from imagegen.train.trainer import TrainConfig, sample_conditioning
    from imagegen.train.runs import get_run
    from models.checkpoint import load_family, read_checkpoint

    root = tmp_path / "root"
    register_world_dataset(root, n=64, per_shard=16)
    spec = f"diffusers:{teacher_pipe}"
    argv = ["distill", "--teacher", spec, "--dataset", "world-tiny", "--steps", "200", "--data-root", str(root),
            "--no-prefect", "--json", "--set", "batch_size=16", "--set", "lr=3e-4", "--set", "lora_rank=16",
            "--set", "target=ema", "--set", "target_ema=0.9", "--set", "distance=l2", "--set", "report_count=10"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "lcm_lora" and summary["teacher_run"] == spec
    run = get_run(root, summary["student_run"])
    assert run.card["config"]["family"] == "lcm_lora"
    assert run.card["config"]["model"]["base_files"]["unet/diffusion_pytorch_model.safetensors"]
    tensors, meta = read_checkpoint(Path(summary["student_checkpoint"]))
    kept = {k.split("/", 1)[1] for k in tensors if k.startswith(("model/", "ema/"))}
    assert kept and all(".lora_" in k or k.startswith("target_") for k in kept), "the checkpoint is the adapter alone"
    assert meta["family_info"]["base_files"] == run.card["config"]["model"]["base_files"]
    from safetensors.torch import load_file

    orig = load_file(str(teacher_pipe / "unet" / "diffusion_pytorch_model.safetensors"))

    rows = {(r["model"], r["steps"]): r for r in summary["report"]["rows"]}
    mse = {k: v["mse_to_reference"] for k, v in rows.items()}
    assert {("teacher", 50), ("teacher", 4), ("student", 1), ("student", 4), ("student_lcm", 4)} <= set(mse)
    assert mse[("student", 4)] < mse[("teacher", 4)], mse  # the goal
    # the same noise and prompts as the report: the adapters-off student (= the teacher with the LCM
    # sampler, before distillation) is further at 1 step
    student = load_family(summary["student_checkpoint"])
    base = {k.replace(".base_layer", ""): v for k, v in student.net.state_dict().items() if "lora_" not in k}
    assert set(base) == set(orig) and all(torch.equal(base[k], orig[k]) for k in orig), "the base is the teacher's"
    cfg = TrainConfig(**run.card["config"])
    x_T = torch.randn((10, *student.noise_shape), generator=torch.Generator().manual_seed(0))
    cond = sample_conditioning(cfg, 10)
    with student.adapters_off():  # the student's pipeline shares its UNet: adapters off = the teacher
        ref = student.model.sample(10, cond, steps=50, x_T=x_T)
        before = float((student.sample(10, cond, steps=1, x_T=x_T) - ref).pow(2).mean())
    assert abs(float((student.sample(10, cond, steps=1, x_T=x_T) - ref).pow(2).mean()) - mse[("student", 1)]) < 1e-5
    assert mse[("student", 1)] < 0.9 * before, (mse, before)
    print("LCM-LoRA MSE to the teacher at 50 steps:", {f"{m}@{k}": round(v, 4) for (m, k), v in mse.items()},
          "adapters off @1:", round(before, 4))

    # the adapter alone, diffusers' format: load_lora_weights + LCMScheduler = the family's gamma-1 sampler
    adapter = Path(summary["adapter"])
    keys = list(load_file(str(adapter)))
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    assert any("resnets" in k and "conv1" in k for k in keys)  # convolutions too, not only attention
    pipe = StableDiffusionPipeline.from_pretrained(teacher_pipe, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    P = ["a red circle", "a blue square"]
    x = x_T[:2]
    theirs = pipe(P, num_inference_steps=4, guidance_scale=1.0, latents=x.clone(), output_type="pt",
                  generator=torch.Generator().manual_seed(3)).images * 2 - 1
    ours = student.sample(2, P, steps=4, x_T=x, generator=torch.Generator().manual_seed(3), gamma=1.0)
    assert torch.allclose(ours, theirs.clamp(-1, 1), atol=1e-4), float((ours - theirs).abs().max())
    # the same request again reuses the run, the adapter and the report
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["student_run"] == summary["student_run"] and again["report"]["reused"]


@pytest.mark.slow
def test_lcm_lora_checkpoint_is_the_adapter_and_resumes_exactly(tmp_path):
    """The checkpoint holds what training changes (LoRA weights, the guidance embedding, the EMA
    target adapters, their EMA and moments) and the base's file hashes; the full model is rebuilt
    from the pipeline on resume (bit-exact against an uninterrupted run) and on load, and a changed
    base is refused from the checkpoint's own record (this config carries no base_files)."""
    from _diffusers_tiny import tiny_sd_pipeline
    from _helpers import register_world_dataset

    from imagegen.registry import get_dataset
    from imagegen.train.checkpoint import CheckpointError, read_checkpoint
    from imagegen.train.trainer import train
    from models.checkpoint import load_family

    pipe = tiny_sd_pipeline(tmp_path / "pipe", seed=0)
    root = tmp_path / "root"
    shards = get_dataset(root, register_world_dataset(root, n=8, per_shard=8)).shards
    cfg = {"family": "lcm_lora", "model": {"pipeline": f"diffusers:{pipe}", "image_size": 16, "rank": 2,
                                          "guidance_embedding": 8, "guidance_min": 1.0, "guidance_max": 2.0,
                                          "target": "ema", "ddim_steps": 10},
           "steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "ema_decay": 0.5, "ckpt_every": 2,
           "epoch_batches": 2, "shuffle_buffer": 4, "sample_count": 1, "sample_steps": 1, "seed": 0}
    straight = train(cfg, shards, tmp_path / "a")
    assert not train(cfg, shards, tmp_path / "b", stop_after=3)["finished"]  # "killed" at 3, checkpoint at 2
    resumed = train(cfg, shards, tmp_path / "b")
    assert resumed["start_step"] == 2 and resumed["finished"]
    ta, meta = read_checkpoint(Path(straight["checkpoint"]))
    tb, _ = read_checkpoint(Path(resumed["checkpoint"]))
    assert set(ta) == set(tb)
    for k in ta:
        if k.startswith(("model/", "ema/", "optim/")):
            assert torch.equal(ta[k], tb[k]), k
    kept = {k[len("model/"):] for k in ta if k.startswith("model/")}
    # the EMA shadows the trained adapter only; the target adapters (an EMA already) are kept once
    assert {k[len("ema/"):] for k in ta if k.startswith("ema/")} == {k for k in kept if not k.startswith("target_")}
    assert all(".lora_" in k or "cond_proj" in k or k.startswith("target_") for k in kept), sorted(kept)[:5]
    assert "net.time_embedding.cond_proj.weight" in kept and "target_0" in kept
    assert meta["family_info"]["base_files"]["unet/diffusion_pytorch_model.safetensors"]
    fam = load_family(straight["checkpoint"])
    assert set(fam.checkpoint_state()) == kept
    assert torch.equal(fam.net.time_embedding.cond_proj.weight, ta["ema/net.time_embedding.cond_proj.weight"])
    x = fam.sample(1, ["a red circle"], steps=2, guidance=1.5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()
    # the same path, other weights: resuming and loading are refused, naming the checkpoint's record
    shutil.rmtree(pipe)
    tiny_sd_pipeline(pipe, seed=1)
    with pytest.raises(CheckpointError, match=r"base pipeline changed.*recorded in its checkpoint"):
        train(cfg, shards, tmp_path / "b")
    with pytest.raises(ValueError, match=r"base pipeline changed.*recorded in its checkpoint"):
        load_family(straight["checkpoint"])


@pytest.mark.slow
def test_guidance_embedding_is_fed_like_a_pipeline_with_time_cond_proj(teacher_pipe, tmp_path):
    """With guidance_embedding=D the student gets UNet's cond_proj (zero at start: the base model);
    one training step moves it; exported, attach_guidance_embedding makes StableDiffusionPipeline feed
    the same w embedding (its timestep_cond) as the family's sampler."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from models.base import train_step
    from models.lcm_lora import GUIDANCE_FILE, attach_guidance_embedding
    from models.registry import build_family

    spec = f"diffusers:{teacher_pipe}"
    fam = build_family("lcm_lora", {"pipeline": spec, "image_size": 16, "rank": 4, "guidance_embedding": 32,
                                    "guidance_min": 1.5, "guidance_max": 3.0, "target": "ema"})
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with fam.adapters_off():
        base = fam.sample(2, ["a", "b"], steps=2, x_T=x, guidance=2.0, gamma=0.0)
    assert torch.allclose(base, fam.sample(2, ["a", "b"], steps=2, x_T=x, guidance=2.0, gamma=0.0))
    opt = {"model": torch.optim.AdamW([p for p in fam.parameters() if p.requires_grad], lr=1e-2)}
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": ["a red circle"] * 4}
    for _ in range(2):
        train_step(fam, opt, batch, torch.Generator().manual_seed(0))
        fam.after_step()
    w = fam.net.time_embedding.cond_proj.weight
    assert float(w.detach().abs().max()) > 0 and fam.target_0.shape == next(p for _, p in fam._adapter_params()).shape
    # through diffusers: LoRA file + the embedding attached; the pipeline embeds guidance_scale - 1
    from diffusers import StableDiffusionPipeline as SD
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = tmp_path / "adapter"
    SD.save_lora_weights(out, unet_lora_layers={k: v for k, v in get_peft_model_state_dict(fam.net).items()
                                                if "cond_proj" not in k}, safe_serialization=True)
    save_file({"time_embedding.cond_proj.weight": w.detach().contiguous()}, str(out / GUIDANCE_FILE))
    pipe = StableDiffusionPipeline.from_pretrained(teacher_pipe, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    attach_guidance_embedding(pipe.unet, out)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    theirs = pipe(["a", "b"], num_inference_steps=2, guidance_scale=2.0, latents=x.clone(), output_type="pt",
                  generator=torch.Generator().manual_seed(3)).images * 2 - 1
    ours = fam.sample(2, ["a", "b"], steps=2, x_T=x, guidance=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, theirs.clamp(-1, 1), atol=1e-4), float((ours - theirs).abs().max())


@pytest.mark.slow
def test_a_diffusers_run_is_named_by_its_bases_files(tmp_path):
    """The run id of a diffusers_lora (and lcm_lora) run hashes the pipeline's file hashes, not its
    path: the same folder resumes the same run, a changed folder at the same path is another run,
    and a checkpoint made on the old files is refused on the new ones, naming both identities."""
    from _diffusers_tiny import tiny_sd_pipeline
    from _helpers import register_world_dataset

    from imagegen.train.runs import TrainRequest, prepare, train_run
    from models.checkpoint import load_family

    pipe = tiny_sd_pipeline(tmp_path / "pipe", seed=0)
    root = tmp_path / "root"
    register_world_dataset(root, n=8, per_shard=8)
    train = {"family": "diffusers_lora", "model": {"pipeline": f"diffusers:{pipe}", "image_size": 16, "rank": 2},
             "steps": 2, "batch_size": 2, "lr": 1e-3, "ckpt_every": 2, "epoch_batches": 2, "shuffle_buffer": 4,
             "sample_count": 1, "sample_steps": 1}
    req = TrainRequest(dataset="world-tiny", train=train)
    first = train_run(req, root)
    assert prepare(req, root).run_id == first["run_id"]
    assert train_run(req, root)["reused"]
    # another base saved at the same path (other weights): another run id, and the old checkpoint is refused
    shutil.rmtree(pipe)
    tiny_sd_pipeline(pipe, seed=1)
    assert prepare(req, root).run_id != first["run_id"]
    with pytest.raises(ValueError, match=r"base pipeline changed.*trained on files [0-9a-f]{16} .*now holds files "
                                         r"[0-9a-f]{16}.*unet/diffusion_pytorch_model.safetensors: recorded"):
        load_family(first["checkpoint"])
    # a request that records the old identity is refused before any step (the run layer's check)
    from imagegen.train.runs import RunError

    old = json.loads((Path(first["run_dir"]) / "config.json").read_text())["model"]["base_files"]
    with pytest.raises(RunError, match="base pipeline changed"):
        prepare(TrainRequest(dataset="world-tiny", train={**train, "model": {**train["model"], "base_files": old}}),
                root)
