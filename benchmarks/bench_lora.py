"""LoRA vs full fine-tuning of a diffusers UNet, and the sampling overhead of the project's wrapper.

1. **Training** (``--mode cpu``, default): the same tiny UNet2DConditionModel (random weights, eps
   loss on random latents and text embeddings, AdamW) trained in full and with a peft LoRA (rank
   ``--rank`` on the attention projections to_q/to_k/to_v/to_out.0, base frozen).  Each variant
   runs in its own subprocess; reported: steps/s (median of timed steps after warm-up), trainable
   parameters, and the training memory above the process's memory after the model was built
   (peak RSS delta on CPU; ``torch.cuda.max_memory_allocated`` on a GPU), as LoRA/full ratios.
   ``--mode gpu`` (a lent device): an SD1.5-sized UNet (320/640/1280/1280 channels, cross-attention
   768) at 512^2 (64^2 latents) in bf16: steps/s and peak GiB for both variants.
2. **Sampling overhead**: a tiny Stable Diffusion pipeline saved with save_pretrained and loaded
   through ``models.hf_diffusers.DiffusersModel`` (sampler="pipeline") against calling the same
   diffusers pipeline directly, same scheduler, steps, prompts and latents; reported as
   direct_time / wrapper_time (target >= 0.95), medians of alternated repeats.

3. **Checkpoint size** (``--mode ckpt``): a ``diffusers_lora`` (rank ``--rank``) and an
   ``lcm_lora`` family (rank ``--rank``, EMA target, guidance embedding) on the tiny pipeline,
   one AdamW step, then the trainer's ``save_checkpoint`` twice in the same run: the adapter-only
   layout (``checkpoint_state()``, EMA of those entries) and the former layout (the whole
   state_dict and an EMA of all of it); bytes of ``tensors.safetensors`` and their ratio.  Plus
   the adapter size of an SD1.5 UNet (its config on the meta device: 860M parameters) at each
   family's default rank, and what the two layouts hold there (fp32).

    nice -n 10 .venv/bin/python benchmarks/bench_lora.py [--mode cpu|gpu|ckpt] [--steps 8] [--rank 4]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TINY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=8, attention_head_dim=8, cross_attention_dim=64,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def train_child(variant: str, mode: str, steps: int, warmup: int, rank: int, batch: int) -> dict:
    """One variant's figures, in this (fresh) process."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    gpu = mode == "gpu"
    if not gpu:
        torch.set_num_threads(1)
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = SD15 if gpu else TINY
    unet = UNet2DConditionModel(**cfg).to(dev, dtype)
    if variant == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian"))
        for n, p in unet.named_parameters():  # adapters train in float32 (the usual mixed-precision LoRA setup)
            if "lora_" in n:
                p.data = p.data.float()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    side = cfg["sample_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, side, side, generator=g).to(dev, dtype)
    ctx = torch.randn(batch, 77 if gpu else 16, cfg["cross_attention_dim"], generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    base_rss = _rss_bytes()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            out = unet(x, t, encoder_hidden_states=ctx).sample
        loss = (out.float() - x.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    res = {"variant": variant, "steps_per_s": 1.0 / statistics.median(times),
           "trainable_params": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in unet.parameters())}
    if gpu:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["train_mem_gib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
    else:
        res["train_mem_mib"] = max(0, _rss_bytes() - base_rss) / 2**20
    return res


def bench_training(mode: str, steps: int, warmup: int, rank: int, batch: int) -> dict:
    out = {}
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--child", variant, "--mode", mode, "--steps", str(steps),
               "--warmup", str(warmup), "--rank", str(rank), "--batch", str(batch)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out[variant] = json.loads(line)
    mem = "train_mem_gib" if mode == "gpu" else "train_mem_mib"
    out["ratio_steps_per_s"] = out["lora"]["steps_per_s"] / out["full"]["steps_per_s"]
    out["ratio_train_mem"] = out["lora"][mem] / max(out["full"][mem], 1e-9)
    out["ratio_trainable"] = out["lora"]["trainable_params"] / out["full"]["trainable_params"]
    return out


def bench_sampling(repeats: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from _diffusers_tiny import tiny_sd_pipeline
    from diffusers import StableDiffusionPipeline

    from models.hf_diffusers import DiffusersModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_sd_pipeline(Path(tmp) / "pipe")
        model = DiffusersModel(f"diffusers:{folder}")
        pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        prompts = ["a cat", "the dog", "a red cat", "the cat"]
        x = torch.randn(len(prompts), *model.noise_shape, generator=torch.Generator().manual_seed(0))

        def ours() -> None:
            model.sample_result(len(prompts), prompts, sampler="pipeline", steps=steps, guidance=3.0, x_T=x)

        def direct() -> None:
            with torch.no_grad():
                pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, latents=x.clone(), output_type="pt")

        ours(), direct()  # warm-up
        t_ours, t_direct = [], []
        for _ in range(repeats):
            for fn, acc in ((ours, t_ours), (direct, t_direct)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
    mo, md = statistics.median(t_ours), statistics.median(t_direct)
    return {"wrapper_s": mo, "direct_s": md, "speed_vs_direct": md / mo, "steps": steps, "batch": len(prompts),
            "repeats": repeats}


SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
SD15_TEXT_PARAMS = 123_060_480  # CLIP ViT-L/14 text transformer of SD1.5


def bench_checkpoint(rank: int) -> dict:
    import torch
    from _diffusers_tiny import tiny_sd_pipeline

    from imagegen.train.checkpoint import save_checkpoint
    from imagegen.train.ema import EMA
    from models.registry import build_family

    class FormerLayout:  # what a checkpoint held before the adapter-only hooks: the whole state_dict
        def __init__(self, fam: torch.nn.Module) -> None:
            self.state_dict = fam.state_dict

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_sd_pipeline(Path(tmp) / "pipe")
        for name, extra in (("diffusers_lora", {}), ("lcm_lora", {"target": "ema", "guidance_embedding": 32})):
            fam = build_family(name, {"pipeline": f"diffusers:{pipe}", "image_size": 16, "rank": rank, **extra})
            opt = torch.optim.AdamW([p for p in fam.parameters() if p.requires_grad], lr=1e-3)
            fam.loss({"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a cat", "a dog"]},
                     torch.Generator().manual_seed(0)).losses["model"].backward()
            opt.step()
            sizes = {}
            for layout, fam_view, ema in (("adapter_only", fam, EMA(fam, 0.9, names=fam.checkpoint_state())),
                                          ("former", FormerLayout(fam), EMA(fam, 0.9))):
                ck = save_checkpoint(Path(tmp) / f"{name}-{layout}", 1, family=fam_view, optimizers={"model": opt},
                                     schedulers={}, ema=ema, config={"family": name}, generator_states={},
                                     trainer_state={}, keep=1)
                sizes[layout] = (ck / "tensors.safetensors").stat().st_size
            out[name] = {**sizes, "ratio": sizes["former"] / sizes["adapter_only"],
                         "adapter_params": sum(p.numel() for p in fam.parameters() if p.requires_grad)}
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from models.diffusers_lora import DiffusersLoraConfig
    from models.lcm_lora import LcmLoraConfig

    sd15 = {}
    for name, C in (("diffusers_lora", DiffusersLoraConfig), ("lcm_lora", LcmLoraConfig)):
        r, targets = C.model_fields["rank"].default, C.model_fields["targets"].default
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SD15_UNET)
        base = sum(p.numel() for p in unet.parameters())
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=list(targets)))
        a = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        copies = 4  # weights, EMA, AdamW exp_avg and exp_avg_sq (lcm_lora's EMA target adds 2 more)
        former = 2 * (base + a + SD15_TEXT_PARAMS) * 4 + 2 * a * 4
        sd15[name] = {"rank": r, "unet_params": base, "adapter_params": a, "adapter_only_bytes": copies * a * 4,
                      "former_bytes": former, "ratio": former / (copies * a * 4)}
    out["sd15_fp32"] = sd15
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["cpu", "gpu", "ckpt"], default="cpu")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None, help="default 4 (cpu) / 4 (gpu)")
    ap.add_argument("--sample-repeats", type=int, default=5)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    batch = a.batch or 4
    if a.child:
        print(json.dumps(train_child(a.child, a.mode, a.steps, a.warmup, a.rank, batch)))
        return 0
    if a.mode == "ckpt":
        c = bench_checkpoint(a.rank)
        print(f"checkpoint tensors.safetensors bytes, tiny pipeline, rank {a.rank} (former layout = whole state_dict + its EMA)")
        for name in ("diffusers_lora", "lcm_lora"):
            r = c[name]
            print(f"{name:15s} adapter-only {r['adapter_only']:>10,d}  former {r['former']:>10,d}  "
                  f"{r['ratio']:.1f}x smaller  ({r['adapter_params']:,d} adapter params)")
        for name, r in c["sd15_fp32"].items():
            print(f"SD1.5 {name:15s} rank {r['rank']}: {r['adapter_params']:,d} adapter params of {r['unet_params']:,d}; "
                  f"adapter-only ~{r['adapter_only_bytes'] / 2**20:,.0f} MiB vs former ~{r['former_bytes'] / 2**30:,.2f} GiB "
                  f"({r['ratio']:.0f}x)")
        print(json.dumps({"mode": "ckpt", **c}))
        return 0
    train = bench_training(a.mode, a.steps, a.warmup, a.rank, batch)
    mem_key, unit = ("train_mem_gib", "GiB") if a.mode == "gpu" else ("train_mem_mib", "MiB")
    print(f"LoRA vs full fine-tuning ({'SD1.5-sized UNet, 512^2, bf16' if a.mode == 'gpu' else 'tiny UNet, CPU'}, "
          f"batch {batch}, rank {a.rank})")
    print(f"{'variant':8s} {'steps/s':>9s} {'trainable':>12s} {'train mem ' + unit:>16s}"
          + ("  peak GiB" if a.mode == "gpu" else ""))
    for v in ("full", "lora"):
        r = train[v]
        print(f"{v:8s} {r['steps_per_s']:9.3f} {r['trainable_params']:12d} {r[mem_key]:16.1f}"
              + (f"  {r['peak_gib']:8.2f}" if a.mode == "gpu" else ""))
    print(f"ratios LoRA/full: steps/s {train['ratio_steps_per_s']:.2f}x, training memory {train['ratio_train_mem']:.2f}x, "
          f"trainable parameters {train['ratio_trainable']:.4f}x")
    out = {"mode": a.mode, "training": train}
    if not a.skip_sampling:
        s = bench_sampling(a.sample_repeats, a.sample_steps)
        print(f"sampling: wrapper {s['wrapper_s'] * 1e3:.1f} ms vs diffusers pipeline directly {s['direct_s'] * 1e3:.1f} ms "
              f"({s['steps']} steps, batch {s['batch']}): {s['speed_vs_direct']:.3f}x of direct (target >= 0.95)")
        out["sampling"] = s
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
