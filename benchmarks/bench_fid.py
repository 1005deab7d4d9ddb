"""FID feature extraction on CPU, decode included: imagegen's path vs bare clean-fid, same folder, same run.

Both contenders decode the same PNG folder, resize with clean-fid's ``clean`` mode (PIL bicubic
to 299x299) and run the same feature network; imagegen adds its folder checks (every file's
header read, sizes compared) and its own file listing.  The goal is imagegen >= 0.95x bare.

The network is torchvision's Inception-v3 with *random* weights (pool features, 2048-d): the
real FID weights cannot be downloaded on this offline machine, and throughput does not depend on
the weights' values, only on the architecture, which is the same.  Use ``--extractor tiny`` to
make the network cheap and expose the data path's own overhead.

    .venv/bin/python benchmarks/bench_fid.py [--n 256] [--size 64] [--repeats 3] [--extractor inception|tiny]

Prints a table and one line of JSON; wall-clock, best of ``--repeats`` rounds taking turns.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.evaluate.fid import clean_fid_features  # noqa: E402


class RandomInceptionPool(torch.nn.Module):
    """torchvision Inception-v3 (random weights) up to the 2048-d pool, on [B,3,H,W] in 0..255."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        net.fc = torch.nn.Identity()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x / 127.5) - 1.0)


class Tiny(torch.nn.Module):
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def make_folder(folder: Path, n: int, size: int) -> None:
    from imagegen.world.scene import WorldConfig, render_scene

    world = WorldConfig()
    for i in range(n):
        _, im = render_scene(world, i)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        im.save(folder / f"{i:06d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--extractor", choices=["inception", "tiny"], default="inception")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import cleanfid.fid as cfid

    model = RandomInceptionPool() if args.extractor == "inception" else Tiny()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_folder(folder, args.n, args.size)

        def bare() -> np.ndarray:
            return cfid.get_folder_features(str(folder), model=model, num_workers=0, batch_size=args.batch,
                                            device=torch.device("cpu"), mode="clean", verbose=False)

        def ours() -> np.ndarray:
            return clean_fid_features(folder, mode="clean", model=model, batch_size=args.batch, num_workers=0,
                                      device="cpu")

        best = {"bare clean-fid": float("inf"), "imagegen": float("inf")}
        same = None
        for _ in range(args.repeats):
            for name, fn in (("bare clean-fid", bare), ("imagegen", ours)):
                t0 = time.perf_counter()
                feats = fn()
                best[name] = min(best[name], time.perf_counter() - t0)
                if name == "imagegen":
                    same = bool(np.allclose(feats, ref, atol=1e-4))
                else:
                    ref = feats
    rate = {k: args.n / v for k, v in best.items()}
    ratio = rate["imagegen"] / rate["bare clean-fid"]
    print(f"{'contender':16s} {'images/s':>10s}")
    for k, v in rate.items():
        print(f"{k:16s} {v:10.1f}")
    print(f"imagegen / bare = {ratio:.3f}  (goal >= 0.95); same features: {same}")
    print(json.dumps({"n": args.n, "size": args.size, "extractor": args.extractor, "batch": args.batch,
                      "threads": torch.get_num_threads(), "images_per_s": rate, "ratio": ratio,
                      "same_features": same, "machine": platform.machine()}))


if __name__ == "__main__":
    main()
