"""DiT-B/2 training throughput and MFU on 32x32x4 latents: bf16 autocast, torch.compile, SDPA attention.

The model is the repo's flow-matching family (``models/flow.py``) with the repo's DiT
(``models/nets/dit.py``, attention through ``F.scaled_dot_product_attention``), configured as
DiT-B/2 on ImageNet latents: ``net="dit", net_size="B"`` (patch 2), ``channels=4``,
``image_size=32``, ``data="latents"``, class conditioning with 1000 classes.  Batches are
synthetic random latents and labels already on the device, so this measures the model step,
not the data path.  One timed step = ``family(batch, gen)`` under autocast (as the trainer
does: fp32 weights, bf16 matmuls), ``zero_grad``, ``backward``, ``clip_grad_norm_`` and a
``torch.optim.AdamW`` step (``fused=True`` on CUDA).  ``--compile`` compiles the DiT in place
(``nn.Module.compile``); the loss glue around it runs eagerly.

FLOP convention: matmul and conv FLOPs counted as 2*m*n*k, attention scores and weighted sum
included (``DiT.flops_per_forward``); elementwise ops, norms, softmax and the optimizer not
counted.  Training FLOPs per image = 3 x forward FLOPs (backward = 2 x forward: Kaplan et al.
2020, "Scaling Laws for Neural Language Models", Sec. 2.1, C ~ 6N per token; the MFU definition
of PaLM, Chowdhery et al. 2022, Appendix B, whose 6N + 12*L*H*Q*T per token is exactly 3x this
forward count).  Rematerialisation is not counted (model FLOPs, not hardware FLOPs).
MFU = achieved FLOP/s / the card's dense bf16 peak (NVIDIA datasheets, without sparsity):
H100 SXM 989.4 TFLOP/s, H100 PCIe 756, H200 989.4, A100 312; other cards: pass --peak-tflops,
else MFU is reported as unknown.  fp32 rows are also divided by the bf16 peak.

    python benchmarks/gpu_train_mfu.py --out /tmp/mfu.json             # GPU: compile + bf16, B/2
    python benchmarks/gpu_train_mfu.py --compare --out /tmp/mfu.json   # + eager bf16, eager fp32
    .venv/bin/python benchmarks/gpu_train_mfu.py --device cpu --size tiny --batch 4 --steps 3 \\
        --no-compile --dtype fp32                                      # CPU smoke run, seconds

Defaults (batch 256, 20 warm-up + 50 timed steps) take about a minute on an H100, most of it
compiling; ``--compare`` adds two eager rows of ``--compare-steps`` steps each (fp32 eager is
the slow one), still within a few minutes.  Prints a table and one line of JSON (also written
to ``--out``).  Needs torch, numpy and pydantic (models/ configs are pydantic models).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from models.registry import build_family  # noqa: E402
except ImportError as exc:  # the GPU image may lack pydantic
    raise SystemExit(f"gpu_train_mfu: cannot import the repo's models ({exc}); models/ needs torch, numpy and "
                     "pydantic (with pydantic-core, annotated-types, typing-inspection)") from exc

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def peak_for(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, table entry) for a CUDA device name; (None, reason) when unknown."""
    name = device_name.upper()
    if "H200" in name:  # "NVIDIA H200", "NVIDIA H200 NVL"?, "NVIDIA GH200 480GB" (same SM count and clocks)
        if "NVL" in name:
            return None, f"{device_name!r}: NVL variant, not in the table"
        return PEAK_BF16_TFLOPS["H200"], "H200"
    if "H100" in name:
        if "PCIE" in name:
            return PEAK_BF16_TFLOPS["H100 PCIe"], "H100 PCIe"
        if "NVL" in name:
            return None, f"{device_name!r}: H100 NVL, not in the table"
        return PEAK_BF16_TFLOPS["H100 SXM"], "H100 SXM"  # "NVIDIA H100 80GB HBM3", "H100 SXM5 ..."
    if "A100" in name:
        return PEAK_BF16_TFLOPS["A100"], "A100"
    return None, f"{device_name!r} is not in the peak table"


def family_config(size: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"net": "dit", "net_size": size, "image_size": 32, "channels": 4, "data": "latents",
                           "conditioning": "class", "num_classes": 1000}
    if size != "tiny":
        cfg["net_overrides"] = {"patch_size": 2}
    return cfg


def model_name(family: Any) -> str:
    c = family.net.cfg
    return f"DiT-{family.cfg.net_size}/{c.patch_size} (d={c.hidden_size}, depth={c.depth}, heads={c.num_heads})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flash_available(device: torch.device, heads: int, head_dim: int, tokens: int, dtype: torch.dtype) -> str:
    """Whether SDPA's flash kernel accepts this attention shape/dtype on this device."""
    if device.type != "cuda":
        return "n/a (CPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return "yes"
    except RuntimeError:
        return "no"


def run_variant(size: str, batch: int, steps: int, warmup: int, compile_net: bool, dtype: str,
                device: torch.device, seed: int, compile_mode: str) -> dict[str, Any]:
    """Build a fresh family + AdamW, run warmup then timed steps; throughput, FLOP/s and memory."""
    torch.manual_seed(seed)
    family = build_family("flow", family_config(size)).to(device)
    family.train()
    params = [p for p in family.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
    fwd_flops = family.net.flops_per_forward(batch)
    if compile_net:
        family.net.compile(mode=None if compile_mode == "default" else compile_mode)
    gen = torch.Generator(device=device).manual_seed(seed)
    pool = [{"image": torch.randn(batch, 4, 32, 32, device=device, generator=gen),
             "label": torch.randint(0, 1000, (batch,), device=device, generator=gen)} for _ in range(4)]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext())

    def step(i: int) -> torch.Tensor:
        with autocast:
            loss = family(pool[i % len(pool)], gen).losses["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    t1 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    sync(device)
    t2 = time.perf_counter()
    final_loss = float(loss.detach())
    if not torch.isfinite(torch.tensor(final_loss)):
        raise FloatingPointError(f"non-finite loss {final_loss} after {warmup + steps} steps")
    seconds = t2 - t1
    train_flops = 3 * fwd_flops * steps  # per image: 3 x forward (see the module docstring)
    out = {"compile": compile_net, "dtype": dtype, "batch": batch, "steps": steps, "warmup": warmup,
           "warmup_s": round(t1 - t0, 2), "step_ms": round(1000 * seconds / steps, 2),
           "images_per_s": round(batch * steps / seconds, 1), "tflops": round(train_flops / seconds / 1e12, 4),
           "fwd_gflops_per_image": round(fwd_flops / batch / 1e9, 3), "final_loss": round(final_loss, 5),
           "peak_mem_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if device.type == "cuda" else None)}
    del family, opt, pool
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "S", "B"], default="B", help="DiT preset (S and B with patch 2)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50, help="timed steps")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (the compile happens here)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the DiT")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 = autocast, fp32 weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    ap.add_argument("--compare", action="store_true",
                    help="also run eager with the same dtype and eager with the other dtype (one compile only)")
    ap.add_argument("--compare-steps", type=int, default=20, help="timed steps of each --compare row")
    ap.add_argument("--compare-warmup", type=int, default=5, help="warm-up steps of each --compare row")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads; default 1 on CPU (on a busy shared box more threads than free "
                         "cores make every op wait on descheduled threads), torch's own default on CUDA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.batch < 1:
        ap.error("--steps, --warmup and --batch must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device (use --device cpu --size tiny for a smoke run)")

    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
        peak, peak_src = peak_for(dev_name)
    else:
        dev_name, peak, peak_src = (f"CPU ({os.cpu_count()} cores, {platform.machine()}, torch threads "
                                    f"{torch.get_num_threads()})", None, "CPU: no MFU")
    if args.peak_tflops is not None:
        peak, peak_src = args.peak_tflops, "--peak-tflops"

    variants = [(args.compile, args.dtype, args.steps, args.warmup)]
    if args.compare:
        other = "fp32" if args.dtype == "bf16" else "bf16"
        variants += [(False, args.dtype, args.compare_steps, args.compare_warmup),
                     (False, other, args.compare_steps, args.compare_warmup)]
        seen: set[tuple[bool, str]] = set()  # --no-compile --compare: the main row is already eager
        variants = [v for v in variants if not (v[:2] in seen or seen.add(v[:2]))]

    probe = build_family("flow", family_config(args.size))
    name, n_params = model_name(probe), sum(p.numel() for p in probe.parameters())
    c = probe.net.cfg
    flash = flash_available(device, c.num_heads, c.hidden_size // c.num_heads, c.grid**2,
                            torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    del probe

    rows: list[dict[str, Any]] = []
    for compile_net, dtype, steps, warmup in variants:
        try:
            row = run_variant(args.size, args.batch, steps, warmup, compile_net, dtype, device, args.seed,
                              args.compile_mode)
        except torch.OutOfMemoryError as exc:
            row = {"compile": compile_net, "dtype": dtype, "batch": args.batch, "error": f"out of memory: {exc}"[:300]}
            gc.collect()
            torch.cuda.empty_cache()
        if "tflops" in row:
            row["mfu"] = round(row["tflops"] / peak, 4) if peak else None
        rows.append(row)

    print(f"{name}, {n_params / 1e6:.1f} M params, 32x32x4 latents, 1000 classes; device {dev_name}; torch "
          f"{torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}; fp32 matmul "
          f"precision {torch.get_float32_matmul_precision()!r}; SDPA flash for {args.dtype}: {flash}; peak "
          + (f"{peak:g} TFLOP/s dense bf16 ({peak_src})" if peak else f"unknown ({peak_src}): MFU n/a"))
    print(f"{'variant':<16} {'batch':>5} {'steps':>5} {'warm-up s':>9} {'ms/step':>8} {'images/s':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        label = f"{'compile' if r['compile'] else 'eager'} {r['dtype']}"
        if "error" in r:
            print(f"{label:<16} {r['batch']:>5} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{label:<16} {r['batch']:>5} {r['steps']:>5} {r['warmup_s']:>9.1f} {r['step_ms']:>8.1f} "
              f"{r['images_per_s']:>9.1f} {r['tflops']:>8.4g} {mfu:>6} {mem:>8}")
    fwd = rows[0].get("fwd_gflops_per_image")
    if fwd is not None:
        print(f"FLOPs: {fwd:.2f} GFLOP per image forward (2*m*n*k, attention included), training = 3x forward = "
              f"{3 * fwd:.2f} GFLOP per image; MFU against the dense bf16 peak for every row")
    result = {"bench": "gpu_train_mfu", "model": name, "params": n_params, "device": dev_name,
              "torch": torch.__version__, "cuda": torch.version.cuda, "peak_bf16_tflops": peak,
              "peak_source": peak_src, "sdpa_flash": flash, "goal_mfu": 0.40, "compile_mode": args.compile_mode,
              "flops_convention": "2*m*n*k matmul/conv FLOPs incl. attention; training = 3 x forward "
                                  "(Kaplan et al. 2020; PaLM App. B)",
              "rows": rows}
    line = json.dumps(result)
    print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
