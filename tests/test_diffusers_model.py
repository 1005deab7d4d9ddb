"""diffusers pipelines as models (``diffusers:PATH_OR_REPO_ID[@REVISION]``): a tiny Stable Diffusion
pipeline with random weights, saved with save_pretrained and loaded through the path a real
checkpoint takes; sampled with its own scheduler and with the project's samplers through the
D(x; sigma) wrapper; refusals (not a pipeline, pickled weights, a repository not in the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.hf_diffusers import DiffusersError, check_pipeline_folder, lora_file, parse_lora, parse_spec, resolve_spec


def _fake_pipeline(folder: Path, weights: str) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"],
                                                         "tokenizer": ["transformers", "CLIPTokenizer"],
                                                         "safety_checker": [None, None]}))
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "unet" / weights).write_bytes(b"\x80\x04 not read")
    return folder


def test_spec_parsing_and_refusals(tmp_path, monkeypatch):
    assert parse_spec("diffusers:owner/name@abc123") == ("owner/name", "abc123")
    assert parse_spec("diffusers:owner/name") == ("owner/name", None)
    with pytest.raises(DiffusersError, match="not a diffusers spec"):
        parse_spec("run:abc")
    with pytest.raises(DiffusersError, match="no model_index.json"):
        resolve_spec(f"diffusers:{tmp_path}")
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.json").write_text("{}")
    with pytest.raises(DiffusersError, match="single model"):
        resolve_spec(f"diffusers:{tmp_path / 'single'}")
    # pickled .bin weights: refused by component and file, never opened
    with pytest.raises(DiffusersError, match=r"component 'unet'.*pickled.*diffusion_pytorch_model.bin.*safetensors only"):
        check_pipeline_folder(_fake_pipeline(tmp_path / "pkl", "diffusion_pytorch_model.bin"))
    with pytest.raises(DiffusersError, match="no weights file"):
        check_pipeline_folder(_fake_pipeline(tmp_path / "none", "README.md"))
    with pytest.raises(DiffusersError, match="revision .* only applies"):
        resolve_spec(f"diffusers:{_fake_pipeline(tmp_path / 'ok', 'diffusion_pytorch_model.safetensors')}@v1")
    assert resolve_spec(f"diffusers:{tmp_path / 'ok'}")[1]["pipeline"] == "StableDiffusionPipeline"
    # a repository id that is not in the (empty) Hugging Face cache: named, nothing downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DiffusersError, match="someone/sd-model@main is not in the Hugging Face cache"):
        resolve_spec("diffusers:someone/sd-model@main")
    with pytest.raises(DiffusersError, match="neither an existing folder nor"):
        resolve_spec("diffusers:no such thing")
    # LoRA adapters: PATH[:SCALE], safetensors only
    (tmp_path / "a.bin").write_bytes(b"x")
    assert parse_lora(str(tmp_path / "a.bin") + ":0.5") == (tmp_path / "a.bin", 0.5)
    with pytest.raises(DiffusersError, match="pickled"):
        lora_file(tmp_path / "a.bin")
    with pytest.raises(DiffusersError, match="does not exist"):
        lora_file(tmp_path / "missing.safetensors")


def test_sample_request_takes_diffusers_specs(tmp_path):
    from imagegen.sample import SampleRequest

    req = SampleRequest(model="diffusers:owner/name@rev", prompts=["x"], loras=["a.safetensors:0.7"], resolution=64)
    assert req.is_diffusers
    SampleRequest(run="abc", loras=["a.safetensors"])  # a run takes a peft adapter folder: checked when prepared
    # img2img, inpainting, outpainting, inversion and ControlNet run through diffusers (tests/test_diffusers_edit.py);
    # RePaint resampling not
    SampleRequest(model="diffusers:owner/name", prompts=["x"], init_image="a.png", invert=True)
    with pytest.raises(ValueError, match="resample: not supported for diffusers models"):
        SampleRequest(model="diffusers:owner/name", prompts=["x"], init_image="a.png", mask="m.png", resample=3)
    with pytest.raises(ValueError, match="unknown model spec"):
        SampleRequest(model="hf:owner/name")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from _diffusers_tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe")


@pytest.mark.slow
def test_tiny_pipeline_samples_like_a_run(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from imagegen.sample import SampleRequest, read_parameters, sample
    from models.hf_diffusers import DiffusersModel

    spec = f"diffusers:{tiny_sd}"
    m = DiffusersModel(spec)
    assert m.noise_shape == (4, 8, 8) and m.resolution == 16
    files = m.identity["files"]
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
    assert all(len(h) == 64 for h in files.values())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a cat", "the dog"]
    # the pipeline's own scheduler: exactly what diffusers itself gives on the same noise
    ours = m.sample_result(2, prompts, steps=6, guidance=2.5, negative=["blur", "blur"], x_T=x)
    assert ours.nfe == 6
    direct = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True, local_files_only=True)
    direct.set_progress_bar_config(disable=True)
    ref = direct(prompts, negative_prompt=["blur", "blur"], num_inference_steps=6, guidance_scale=2.5,
                 latents=x.clone(), output_type="pt").images * 2 - 1
    assert torch.allclose(ours.sample, ref.clamp(-1, 1), atol=1e-5)
    # the project's samplers through the D(x; sigma) wrapper solve the same ODE: with many steps they
    # agree with the pipeline's DDIM far better than a 3-step DDIM does
    ddim40 = m.sample(2, prompts, sampler="pipeline", steps=40, x_T=x)
    heun40 = m.sample_result(2, prompts, sampler="edm_heun", steps=40, x_T=x)
    assert heun40.nfe == 79
    ddim3 = m.sample(2, prompts, sampler="pipeline", steps=3, x_T=x)
    close, far = float((heun40.sample - ddim40).pow(2).mean()), float((ddim3 - ddim40).pow(2).mean())
    assert close < far / 20, (close, far)
    euler = m.sample(2, prompts, sampler="pipeline:EulerDiscreteScheduler", steps=40, x_T=x)
    assert float((euler - ddim40).pow(2).mean()) < far / 5
    with pytest.raises(DiffusersError, match="unknown sampler"):
        m.sample(1, ["a"], sampler="ddpm_ancestral")

    # imagegen sample: PNGs with the model's identity, per-image seeds (batch-size independent)
    req = SampleRequest(model=spec, prompts=["a cat", "the dog"], n=3, batch_size=2, steps=4, guidance=2.0,
                        negative="blur", out=str(tmp_path / "a"))
    res = sample(req, tmp_path / "root")
    assert res["n_images"] == 6 and res["model"] == spec and res["family"] == "diffusers"
    p0 = read_parameters(res["files"][0])
    assert p0["model"]["pipeline"] == "StableDiffusionPipeline" and p0["model"]["files"] == files
    assert p0["negative"] == "blur" and p0["steps"] == 4 and p0["sampler"] == "pipeline" and p0["nfe"] == 4
    res1 = sample(req.model_copy(update={"batch_size": 1, "out": str(tmp_path / "b")}), tmp_path / "root")
    for a, b in zip(res["files"], res1["files"]):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    res2 = sample(req.model_copy(update={"sampler": "dpmpp_2m", "resolution": 32, "n": 1, "out": str(tmp_path / "c")}),
                  tmp_path / "root")
    assert Image.open(res2["files"][0]).size == (32, 32)


def test_height_width_sample_a_diffusers_model_non_square(tiny_sd, tmp_path):
    """height/width reach the pipeline: non-square latents give the same images as diffusers' own
    call at that size (its scheduler and the project's samplers alike); a side off the VAE factor
    is refused before the sample's folder is made, naming the value and the factor."""
    from diffusers import StableDiffusionPipeline

    from imagegen.evaluate.run import EvalRequest
    from imagegen.sample import SampleError, SampleRequest, sample
    from models.hf_diffusers import DiffusersModel

    spec = f"diffusers:{tiny_sd}"
    m = DiffusersModel(spec, height=16, width=24)
    assert m.noise_shape == (4, 8, 12)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    ours = m.sample(2, ["a cat", "the dog"], steps=4, guidance=2.0, x_T=x)
    assert ours.shape == (2, 3, 16, 24)
    direct = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True, local_files_only=True)
    direct.set_progress_bar_config(disable=True)
    ref = direct(["a cat", "the dog"], num_inference_steps=4, guidance_scale=2.0, height=16, width=24,
                 latents=x.clone(), output_type="pt").images * 2 - 1
    assert torch.allclose(ours, ref.clamp(-1, 1), atol=1e-5)
    assert m.sample(1, ["a cat"], sampler="edm_euler", steps=3, x_T=x[:1]).shape == (1, 3, 16, 24)

    base = dict(model=spec, prompts=["a cat"], n=1, steps=3)
    wide = sample(SampleRequest(**base, height=16, width=24, out=str(tmp_path / "wide")), tmp_path / "root")
    assert Image.open(wide["files"][0]).size == (24, 16)
    square = sample(SampleRequest(**base, out=str(tmp_path / "sq")), tmp_path / "root")
    assert Image.open(square["files"][0]).size == (16, 16) and square["sample_id"] != wide["sample_id"]
    with pytest.raises(SampleError, match=r"height 17: not a multiple of .*VAE factor 2"):
        sample(SampleRequest(**base, height=17, width=24, out=str(tmp_path / "bad")), tmp_path / "root")
    assert not (tmp_path / "bad").exists()  # refused before any work
    with pytest.raises(DiffusersError, match="width 31"):
        DiffusersModel(spec, width=31)
    with pytest.raises(ValueError, match="resolution= .* or height=/width=, not both"):
        SampleRequest(**base, resolution=32, height=16)
    EvalRequest(model=spec, height=16, width=24, metrics=["clipscore"])
    with pytest.raises(ValueError, match="folder is evaluated at its images' size"):
        EvalRequest(folder=str(tmp_path), height=16, metrics=["clipscore"])


@pytest.mark.slow
def test_evaluate_and_leaderboard_a_diffusers_model(tiny_sd, tmp_path):
    from _helpers import eval_world_root

    from imagegen.evaluate.run import EvalError, EvalRequest, evaluate
    from imagegen.leaderboard import leaderboard

    root = tmp_path / "root"
    eval_world_root(root, n=16)
    spec = f"diffusers:{tiny_sd}"
    with pytest.raises(EvalError, match="needs reference="):
        evaluate(EvalRequest(model=spec, metrics=("fid",), n_samples=4), root)
    with pytest.raises(ValueError, match="exactly one of"):
        EvalRequest(model=spec, run="abc")
    req = EvalRequest(model=spec, reference="world-tiny", n_samples=6, steps=2, guidance=2.0, negative="blur",
                      kid_subset_size=3, kid_subsets=2, geneval_max_prompts=2, geneval_per_prompt=1, batch_size=4)
    s = evaluate(req, root)
    assert s["family"] == "diffusers" and s["nfe"] == 2 and s["n_samples"] == 6 and not s["skipped"], s["skipped"]
    assert any(k.startswith("FD-") for k in s["metrics"]) and "GenEval overall" in s["metrics"]
    assert any(k.startswith("CLIPScore") for k in s["metrics"]) and any(k.startswith(("KID", "KD-")) for k in s["metrics"])
    gen = sorted((Path(s["path"]) / "samples").glob("*.png"))
    assert len(gen) == 6 and Image.open(gen[0]).size == (16, 16)
    assert s["model"]["spec"] == spec and s["model"]["pipeline"] == "StableDiffusionPipeline"
    assert len(s["model"]["files_sha256"]) == 16  # stable_hash of the per-file sha256 map
    assert evaluate(req, root)["reused"] is True
    # the benchmark flow's plan takes diffusers specs among its runs: same settings, an NFE sweep
    from imagegen.benchmark import check_plan, plan, run_plan

    settings = req.model_dump(exclude={"model", "run", "folder"}, exclude_defaults=True)
    jobs = plan(root, [spec], settings=settings, nfe_sweep=[1])
    check_plan(jobs, root)
    assert [(j.model, j.steps) for j in jobs] == [(spec, 2), (spec, 1)]
    summaries = run_plan(jobs, root)
    assert summaries[0]["reused"] is True and summaries[1]["nfe"] == 1
    board = leaderboard(root, summaries)
    assert len(board) == 2 and set(board["model"]) == {spec} and set(board["family"]) == {"diffusers"}
    assert set(board["model_files_sha256"]) == {s["model"]["files_sha256"]}
    # the command line: imagegen evaluate --model diffusers:... (the same evaluation, reused)
    from imagegen.cli import main

    sets = [x for k, v in settings.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["evaluate", "--model", spec, *sets, "--data-root", str(root), "--no-prefect", "--json"]) == 0


@pytest.mark.slow
def test_lora_adapters_in_diffusers_format(tiny_sd, tmp_path):
    from _diffusers_tiny import random_unet_lora, tiny_sd_components
    from diffusers import StableDiffusionPipeline

    from imagegen.sample import SampleRequest, read_parameters, sample
    from models.hf_diffusers import DiffusersModel

    f = random_unet_lora(tiny_sd, tmp_path / "lora")
    spec = f"diffusers:{tiny_sd}"
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = DiffusersModel(spec).sample(1, ["a cat"], steps=3, x_T=x)
    m = DiffusersModel(spec, loras=[f"{f}:0.8"])
    ours = m.sample(1, ["a cat"], steps=3, x_T=x)
    assert float((ours - plain).abs().max()) > 1e-3  # the adapter acts
    assert m.identity["loras"][0]["scale"] == 0.8 and len(m.identity["loras"][0]["sha256"]) == 64
    # diffusers itself, load_lora_weights at the same scale: the same images
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.8])
    ref = pipe(["a cat"], num_inference_steps=3, guidance_scale=1.0, latents=x.clone(), output_type="pt").images * 2 - 1
    assert torch.allclose(ours, ref.clamp(-1, 1), atol=1e-5)
    # through the project's own sampler the adapter acts too
    assert float((m.sample(1, ["a cat"], sampler="dpmpp_2m", steps=3, x_T=x)
                  - DiffusersModel(spec).sample(1, ["a cat"], sampler="dpmpp_2m", steps=3, x_T=x)).abs().max()) > 1e-3
    # imagegen sample --lora PATH:SCALE records the adapter's hash in every PNG
    res = sample(SampleRequest(model=spec, prompts=["a cat"], n=1, steps=2, loras=[f"{f}:0.8"],
                               out=str(tmp_path / "s")), tmp_path / "root")
    p = read_parameters(res["files"][0])
    assert p["loras"] == [f"{f}:0.8"] and p["model"]["loras"][0]["sha256"] == m.identity["loras"][0]["sha256"]
    # an adapter for another base model (cross-attention width 24, not 32): the mismatch is named
    other = tmp_path / "other"
    StableDiffusionPipeline(**tiny_sd_components(cross_dim=24), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(other)
    with pytest.raises(DiffusersError, match=r"shape mismatch: .*attn2\.to_k\.lora_A.* is torch.Size\(\[4, 32\]\) "
                                             r"in the adapter but torch.Size\(\[4, 24\]\) in the model"):
        DiffusersModel(f"diffusers:{other}", loras=[str(f)])
    # a pickled adapter is refused before anything loads
    (tmp_path / "bad.bin").write_bytes(b"\x80\x04")
    with pytest.raises(DiffusersError, match="pickled"):
        sample(SampleRequest(model=spec, prompts=["a"], loras=[str(tmp_path / "bad.bin")]), tmp_path / "root")


@pytest.mark.slow
def test_pretrained_vae_latents_train_a_flow(tiny_sd, tmp_path):
    """encode_dataset with a diffusers AutoencoderKL (its own scaling factor), then a flow family
    trains on those latents and its samples decode through the same VAE."""
    import io
    import tarfile

    from _helpers import register_world_dataset
    from diffusers import AutoencoderKL

    from imagegen.latents import encode_dataset
    from imagegen.registry import get_dataset
    from imagegen.train.runs import train_run
    from models.checkpoint import load_family

    root = tmp_path / "root"
    register_world_dataset(root, n=16, per_shard=8)
    spec = f"diffusers:{tiny_sd}"
    lid = encode_dataset(root, "world-tiny", spec, image_size=16)
    card = get_dataset(root, lid).card
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae", use_safetensors=True)
    assert card["latent_scale"] == vae.config.scaling_factor == 0.18215 and card["latent_shape"] == [4, 8, 8]
    assert card["source"]["autoencoder"] == spec and "vae/diffusion_pytorch_model.safetensors" in \
        card["source"]["autoencoder_identity"]["files"]
    # the stored latent is the posterior mean times the model's scaling factor
    shard = get_dataset(root, lid).shards[0]
    with tarfile.open(shard) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(".npy"))
        key, z = m.name[:-4], np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
    from imagegen.loader import make_dataset

    img = next(s["image"] for s in make_dataset(get_dataset(root, "world-tiny").shards, image_size=16, shuffle_buffer=0)
               if s["key"] == key)
    with torch.no_grad():
        mu = vae.encode(img[None]).latent_dist.mean[0].numpy()
    assert np.allclose(z, mu * 0.18215, atol=1e-5)
    # the same VAE object in memory: the same latents (the identity hashes its tensors, not files)
    lid2 = encode_dataset(root, "world-tiny", vae, image_size=16, name="latents-mem")
    assert lid2 != lid and np.allclose(get_dataset(root, lid2).card["latent_std_before_scaling"],
                                       card["latent_std_before_scaling"], atol=1e-6)
    res = train_run({"dataset": lid, "train": {
        "family": "flow", "model": {"data": "latents", "net": "dit", "net_size": "tiny",
                                    "net_overrides": {"patch_size": 2}},
        "steps": 4, "batch_size": 8, "lr": 1e-3, "ckpt_every": 4, "epoch_batches": 2, "shuffle_buffer": 16,
        "sample_count": 2, "sample_steps": 2}}, root)
    fam = load_family(res["checkpoint"])
    assert fam.cfg.autoencoder == spec and fam.noise_shape == (4, 8, 8)
    x = fam.sample(2, steps=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and x.abs().max() <= 1


@pytest.mark.slow
def test_lora_finetuning_run_on_a_diffusers_unet(tiny_sd, tmp_path):
    """The generic trainer trains only the adapters; the run resumes exactly; the exported adapter
    loads with load_lora_weights and gives the family's own samples."""
    from _helpers import register_world_dataset
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from imagegen.train.runs import get_run, train_run
    from models.checkpoint import load_family, read_checkpoint
    from models.diffusers_lora import export_adapter
    from models.hf_diffusers import DiffusersModel

    from _helpers import eval_world_root

    root = tmp_path / "root"
    eval_world_root(root, n=16, per_shard=8)
    spec = f"diffusers:{tiny_sd}"
    model = {"pipeline": spec, "image_size": 16, "rank": 4, "text_encoder_lora": False}
    train = {"family": "diffusers_lora", "model": model, "steps": 4, "batch_size": 4, "lr": 5e-3, "warmup_steps": 0,
             "ema_decay": 0.5, "ckpt_every": 2, "epoch_batches": 2, "shuffle_buffer": 8, "sample_count": 2,
             "sample_steps": 2, "seed": 0}
    res = train_run({"dataset": "world-tiny", "train": train}, root)
    tensors, meta = read_checkpoint(res["checkpoint"])
    base = {k: v for k, v in load_file(str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")).items()}
    net = {k[len("model/net."):]: v for k, v in tensors.items() if k.startswith("model/net.")}
    lora = [k for k in net if "lora_" in k]
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    changed = [k for k in lora if "lora_B" in k and float(net[k].abs().max()) > 0]
    assert changed, "the adapters trained (B starts at zero)"
    # the checkpoint is the adapter alone (weights, EMA, moments) plus the base's identity
    weights = {k for k in tensors if k.startswith(("model/", "ema/"))}
    assert weights == {f"{p}net.{k}" for p in ("model/", "ema/") for k in lora}, sorted(weights - {f"model/net.{k}" for k in lora})[:5]
    assert meta["family_info"]["base_files"] == meta["config"]["model"]["base_files"]
    loaded = {k.replace(".base_layer", ""): v for k, v in load_family(res["checkpoint"]).net.state_dict().items()
              if "lora_" not in k}
    assert set(loaded) == set(base) and all(torch.equal(loaded[k], base[k]) for k in base), "base weights unchanged"
    assert not any(k.startswith("optim/") and "text_model" in k for k in tensors)
    # resume: a 2-step run continued to 4 gives the same tensors as 4 steps straight
    root2 = tmp_path / "root2"
    register_world_dataset(root2, n=16, per_shard=8)
    a = train_run({"dataset": "world-tiny", "train": train}, root2, stop_after=3)  # "killed" at 3, checkpoint at 2
    assert not a["finished"]
    b = train_run({"dataset": "world-tiny", "train": train}, root2)  # resumes from step 2
    assert b["run_id"] == a["run_id"] and b["finished"]
    t4, _ = read_checkpoint(b["checkpoint"])
    for k in tensors:
        if k.startswith(("model/", "ema/")):
            assert torch.equal(tensors[k], t4[k]), k
    # the adapter alone, in diffusers' format; load_lora_weights in diffusers gives the family's samples
    f = export_adapter(res["checkpoint"], tmp_path / "adapter")
    keys = list(load_file(str(f)))
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    fam = load_family(res["checkpoint"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = fam.sample(2, ["a red circle", "a cat"], steps=3, x_T=x)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(f.parent), weight_name=f.name)
    ref = pipe(["a red circle", "a cat"], num_inference_steps=3, guidance_scale=1.0, latents=x.clone(),
               output_type="pt").images * 2 - 1
    assert torch.allclose(ours, ref.clamp(-1, 1), atol=1e-4)
    via_sample = DiffusersModel(spec, loras=[str(f)]).sample(2, ["a red circle", "a cat"], steps=3, x_T=x)
    assert torch.allclose(ours, via_sample, atol=1e-4)
    assert float((ours - DiffusersModel(spec).sample(2, ["a red circle", "a cat"], steps=3, x_T=x)).abs().max()) > 0
    # the LoRA run is evaluated like any run (captions of its dataset, the family's samplers)
    from imagegen.evaluate.run import EvalRequest, evaluate

    ev = evaluate(EvalRequest(run=res["run_id"], metrics=("fid", "clipscore"), n_samples=4, steps=2,
                              kid_subset_size=2), root)
    assert ev["family"] == "diffusers_lora" and ev["nfe"] == 2 and any(k.startswith("CLIPScore") for k in ev["metrics"])


@pytest.mark.slow
def test_a_toy_sd3_transformer_pipeline(tmp_path):
    """A transformer pipeline (SD3: MMDiT, two CLIPs, no T5, flow matching, VAE with a shift factor)
    through the same loading path: its own scheduler equals diffusers called directly, and the
    project's samplers through the flow -> D(x; sigma) adapter solve the same ODE."""
    from _diffusers_tiny import tiny_sd3_pipeline
    from diffusers import StableDiffusion3Pipeline

    from imagegen.sample import SampleRequest, read_parameters, sample
    from models.hf_diffusers import DiffusersModel

    folder = tiny_sd3_pipeline(tmp_path / "sd3")
    spec = f"diffusers:{folder}"
    m = DiffusersModel(spec)
    assert m.identity["pipeline"] == "StableDiffusion3Pipeline" and m.noise_shape == (4, 8, 8)
    assert "transformer/diffusion_pytorch_model.safetensors" in m.identity["files"]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    P = ["a cat", "the dog"]
    ours = m.sample_result(2, P, steps=4, guidance=2.0, x_T=x)
    assert ours.nfe == 4
    direct = StableDiffusion3Pipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                      text_encoder_3=None, tokenizer_3=None)
    direct.set_progress_bar_config(disable=True)
    ref = direct(P, num_inference_steps=4, guidance_scale=2.0, latents=x.clone(), output_type="pt").images * 2 - 1
    assert torch.allclose(ours.sample, ref.clamp(-1, 1), atol=1e-5)
    a = m.sample(2, P, steps=30, x_T=x)
    close = float((m.sample(2, P, sampler="edm_heun", steps=30, x_T=x) - a).pow(2).mean())
    far = float((m.sample(2, P, steps=3, x_T=x) - a).pow(2).mean())
    assert close < far / 10, (close, far)
    res = sample(SampleRequest(model=spec, prompts=["a cat"], n=1, steps=2, sampler="dpmpp_2m", guidance=2.0,
                               out=str(tmp_path / "s")), tmp_path / "root")
    assert read_parameters(res["files"][0])["model"]["pipeline"] == "StableDiffusion3Pipeline"


def test_lora_loss_applies_the_vaes_shift_factor(tmp_path):
    """FLUX / SD3 VAEs have a shift_factor: the LoRA loss regresses on (mean - shift) * scale, the
    latents the pipeline's decode (z / scale + shift) inverts."""
    from _diffusers_tiny import tiny_sd_components
    from diffusers import StableDiffusionPipeline

    from models.registry import build_family

    comps = tiny_sd_components(seed=0)
    comps["vae"].register_to_config(shift_factor=0.5)
    StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    fam = build_family("diffusers_lora", {"pipeline": f"diffusers:{tmp_path / 'pipe'}", "image_size": 16, "rank": 2})
    vae = fam.model.pipe.vae
    assert vae.config.shift_factor == 0.5
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    P = ["a cat", ""]
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean
        z = (mu - 0.5) * vae.config.scaling_factor
        assert torch.allclose(fam._latents(x), z)
        assert torch.allclose(fam.model.decode(z), vae.decode(mu).sample, atol=1e-5)
        loss = fam._denoise_loss(x, P, torch.Generator().manual_seed(3))

        def by_hand(lat: torch.Tensor) -> torch.Tensor:  # the same draws: t, then eps
            g = torch.Generator().manual_seed(3)
            t = torch.randint(0, 1000, (2,), generator=g)
            eps = torch.randn(lat.shape, generator=g)
            ab = fam.alphas_cumprod[t].view(-1, 1, 1, 1)
            out = fam.net(ab.sqrt() * lat + (1 - ab).sqrt() * eps, t, encoder_hidden_states=fam._embed(P)).sample
            return (out - eps).pow(2).mean()

        shifted, unshifted = by_hand(z), by_hand(mu * vae.config.scaling_factor)
    assert torch.allclose(loss, shifted, rtol=1e-5, atol=0), (float(loss), float(shifted))
    assert abs(float(unshifted - shifted)) > 1e-4 * float(shifted), "the shift makes a difference here"


@pytest.mark.slow
def test_lora_family_options_prior_preservation_and_text_encoder(tiny_sd):
    from models.base import train_step
    from models.registry import build_family

    fam = build_family("diffusers_lora", {"pipeline": f"diffusers:{tiny_sd}", "image_size": 16, "rank": 2,
                                          "alpha": 4.0, "targets": ["to_q", "to_v"], "text_encoder_lora": True,
                                          "prior_prompt": "a cat", "prior_images": 2, "prior_steps": 2})
    names = fam.trainable_names()
    assert names and all("lora_" in n for n in names)
    assert any(n.startswith("text_model.") for n in names) and not any(".to_k." in n for n in names)
    opt = {"model": torch.optim.AdamW([p for p in fam.parameters() if p.requires_grad], lr=1e-2)}
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a sks cat", "a sks cat"]}
    out = train_step(fam, opt, batch, torch.Generator().manual_seed(0))
    assert set(out.logs) == {"instance", "prior"} and fam._prior is not None and len(fam._prior) == 2
    from models.diffusers_lora import adapter_state

    state = adapter_state(fam)
    assert state["text_encoder"] and all("lora" in k for k in state["text_encoder"])
    with pytest.raises(ValueError, match="conditioning is 'text' through the pipeline"):
        build_family("diffusers_lora", {"pipeline": f"diffusers:{tiny_sd}", "text_encoder": "ViT-B-32:openai"})


@pytest.mark.slow
def test_a_diffusers_lora_run_with_more_loras_is_pointed_to_the_pipeline(tiny_sd, tmp_path):
    """A diffusers_lora checkpoint holds the adapter alone (no ``model/net.*`` base weights): extra
    LoRAs on such a run reach the adapter check of imagegen/sample_edit.py, which read the net's
    shapes from that header and refused a fitting adapter as one 'for another base model'; it now
    names the run's kind and the pipeline route, before anything loads.  The run samples as before."""
    from _helpers import eval_world_root

    from imagegen.sample import SampleError, SampleRequest, sample
    from imagegen.sample_edit import _net_weight_shapes
    from imagegen.train.runs import train_run
    root = tmp_path / "root"
    eval_world_root(root, n=8, per_shard=8)
    spec = f"diffusers:{tiny_sd}"
    train = {"family": "diffusers_lora", "model": {"pipeline": spec, "image_size": 16, "rank": 2}, "steps": 1,
             "batch_size": 2, "lr": 5e-3, "warmup_steps": 0, "ckpt_every": 1, "epoch_batches": 1, "shuffle_buffer": 4,
             "sample_count": 1, "sample_steps": 1, "seed": 0}
    res = train_run({"dataset": "world-tiny", "train": train}, root)
    shapes = _net_weight_shapes(res["checkpoint"])
    assert shapes and all(".lora_" in k for k in shapes)  # the header: adapter matrices only
    # a peft adapter folder on the base UNet's to_q projections, shapes from its own header: it fits
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        qs = {k[:-len(".weight")]: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("to_q.weight")}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"{m}.lora_{p}.weight": torch.zeros((2, i) if p == "A" else (o, 2)) for m, (o, i) in qs.items()
               for p in "AB"}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                             "target_modules": ["to_q"]}))
    from models.lora import LoraError, LoraSource, check_lora_fits

    check_lora_fits(LoraSource.from_folder(adapter), {m: tuple(v) for m, v in qs.items()}, "the base UNet")
    with pytest.raises(LoraError, match="another base model"):  # what the checkpoint's header alone said
        check_lora_fits(LoraSource.from_folder(adapter), shapes, "the run's net")
    with pytest.raises(SampleError, match=rf"'diffusers_lora' run, a LoRA adapter over the diffusers pipeline "
                                          rf"{spec}.*sample model={spec}"):
        sample(SampleRequest(run=res["run_id"], prompts=["a cat"], n=1, steps=1, loras=[str(adapter)],
                             out=str(tmp_path / "x")), root)
    assert not (tmp_path / "x").exists()
    out = sample(SampleRequest(run=res["run_id"], prompts=["a cat"], n=1, steps=1, out=str(tmp_path / "ok")), root)
    assert Image.open(out["files"][0]).size == (16, 16)


def test_a_transformer_pipelines_sides_are_multiples_of_its_patch_times_the_vae_factor(tmp_path):
    """SD3's pipeline takes only sides that are multiples of VAE factor x patch size: such a side
    samples, another is refused before loading (naming the value and both factors)."""
    from _diffusers_tiny import tiny_sd3_pipeline

    from imagegen.sample import SampleError, SampleRequest, sample
    from models.hf_diffusers import image_size

    folder = tiny_sd3_pipeline(tmp_path / "sd3", patch_size=2)
    assert image_size(folder, height=16, width=24) == (16, 24)
    with pytest.raises(DiffusersError, match=r"height 18: not a multiple of 4 \(.*VAE factor 2 x its transformer's "
                                             r"patch size 2"):
        image_size(folder, height=18)
    spec = f"diffusers:{folder}"
    with pytest.raises(SampleError, match="width 22: not a multiple of 4"):
        sample(SampleRequest(model=spec, prompts=["a cat"], n=1, steps=1, width=22, out=str(tmp_path / "x")),
               tmp_path / "root")
    assert not (tmp_path / "x").exists()
    res = sample(SampleRequest(model=spec, prompts=["a cat"], n=1, steps=2, height=16, width=24), tmp_path / "root")
    assert Image.open(res["files"][0]).size == (24, 16)
