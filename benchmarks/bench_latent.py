"""Compute saving of latent diffusion: one training step of the same family and network size on
pixels vs on an autoencoder's latents, same process, same batch.

Pixel space: 32x32x3 images; latent space: the 8x8x4 grid of a factor-4 KL autoencoder (the
latents are pre-encoded once into a latent dataset, so the encoder costs nothing per step, as in
the DiT reference work's pre-extracted features).  Reports steps/s, the ratio, and the network
FLOPs per forward from models/nets (models.nets flops_per_forward).

    .venv/bin/python benchmarks/bench_latent.py [--family flow] [--net dit|unet] [--batch 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import build_family  # noqa: E402


def rate(family: str, model: dict, shape: tuple[int, ...], batch: int, steps: int) -> tuple[float, float | None]:
    torch.manual_seed(0)
    fam = build_family(family, model)
    opt = torch.optim.AdamW(fam.parameters(), lr=1e-4)
    x = torch.randn(batch, *shape).clamp(-1, 1)
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        out = fam({"image": x}, g)
        opt.zero_grad(set_to_none=True)
        out.losses["model"].backward()
        opt.step()
    flops = getattr(fam.net, "flops_per_forward", None)
    f = float(flops()) if callable(flops) else None
    return steps / (time.perf_counter() - t0), f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="flow")
    ap.add_argument("--net", default="dit", choices=["dit", "unet"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = {"net": args.net, "net_size": "tiny"}
    if args.net == "dit":
        pix = {**net, "image_size": 32, "net_overrides": {"patch_size": 2}}
        lat = {**net, "image_size": 8, "channels": 4, "data": "latents", "net_overrides": {"patch_size": 2}}
    else:
        pix = {**net, "image_size": 32}
        lat = {**net, "image_size": 8, "channels": 4, "data": "latents",
               "net_overrides": {"attention_resolutions": [8]}}
    rp, fp = rate(args.family, pix, (3, 32, 32), args.batch, args.steps)
    rl, fl = rate(args.family, lat, (4, 8, 8), args.batch, args.steps)
    print(f"{'space':8s} {'steps/s':>9s} {'GFLOP/forward':>14s}")
    print(f"{'pixels':8s} {rp:9.2f} {fp / 1e9 if fp else float('nan'):14.3f}")
    print(f"{'latents':8s} {rl:9.2f} {fl / 1e9 if fl else float('nan'):14.3f}")
    print(f"latent / pixel step rate = {rl / rp:.2f}x")
    print(json.dumps({"family": args.family, "net": args.net, "batch": args.batch, "threads": args.threads,
                      "pixel_steps_per_s": rp, "latent_steps_per_s": rl, "speedup": rl / rp,
                      "pixel_flops": fp, "latent_flops": fl}))


if __name__ == "__main__":
    main()
