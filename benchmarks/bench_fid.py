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

``--extractors inception,clip,dinov2,...`` measures instead the feature extractors of the newer
metrics through the same data path (decode, resize, forward), as images/s and as ratios against
the first one named (the Inception path by default), in one run:

* ``inception``: torchvision Inception-v3 (random weights), 299 px (FID, KID, IS);
* ``clip``: open_clip ViT-L-14's image tower (random weights) through ``ClipImageExtractor``, 224 px
  (FD-CLIP, CMMD uses ViT-L/14 at 336, aesthetic, HPSv2 uses ViT-H-14);
* ``dinov2``: transformers ``Dinov2Model`` with facebook/dinov2-large's shape (ViT-L/14, random
  weights) through ``Dinov2Extractor``, 224 px (FD-DINOv2);
* ``clip-tiny`` / ``dinov2-tiny``: the tests' tiny random models (the data path's own cost).

Throughput does not depend on the weights' values, only on the architecture.  ``--device cuda``
(with ``--batch 256 --n 4096``) is the GPU mode for a lent device; ``--bf16`` runs the network in
bfloat16 autocast there.

    .venv/bin/python benchmarks/bench_fid.py --extractors inception,clip,dinov2 --n 32 --repeats 1
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


def build_extractor(name: str, device: str) -> torch.nn.Module:
    """A feature network by benchmark name (random weights, the real architectures unless '-tiny')."""
    if name == "inception":
        return RandomInceptionPool().to(device)
    if name in ("clip", "clip-tiny"):
        from types import SimpleNamespace

        import open_clip

        from imagegen.clip import ClipSpec
        from imagegen.evaluate.fid import ClipImageExtractor

        if name == "clip":
            model = open_clip.create_model("ViT-L-14", device=device).eval()
        else:
            cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                   "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
            model = open_clip.CLIP(**cfg).to(device).eval()
        size = model.visual.image_size
        clip = SimpleNamespace(model=model, image_size=size[0] if isinstance(size, tuple) else size,
                               device=torch.device(device), identity={},
                               spec=ClipSpec(kind="pretrained", model_name="ViT-L-14" if name == "clip" else "tiny",
                                             tag="random-weights"))
        return ClipImageExtractor(clip).eval()
    if name in ("dinov2", "dinov2-tiny"):
        from transformers import Dinov2Config, Dinov2Model

        from imagegen.evaluate.dinov2 import Dinov2Extractor

        cfg = (Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                            patch_size=14, image_size=518) if name == "dinov2" else
               Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                            image_size=224))
        return Dinov2Extractor(model=Dinov2Model(cfg), name=f"random-{name}", device=device).eval()
    raise SystemExit(f"unknown extractor {name!r}; choose from inception, clip, dinov2, clip-tiny, dinov2-tiny")


def compare_extractors(args: argparse.Namespace) -> None:
    names = [x.strip() for x in args.extractors.split(",") if x.strip()]
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    nets = {n: build_extractor(n, device) for n in names}
    best = {n: float("inf") for n in names}
    dims = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_folder(folder, args.n, args.size)
        workers = args.workers
        for n in names:  # warm-up (first-call allocations, cuDNN autotuning)
            clean_fid_features(sorted(folder.glob("*.png"))[:args.batch], mode="clean", model=nets[n],
                               batch_size=args.batch, num_workers=workers, device=device)
        for _ in range(args.repeats):
            for n in names:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device == "cuda"):
                    feats = clean_fid_features(folder, mode="clean", model=nets[n], batch_size=args.batch,
                                               num_workers=workers, device=device)
                if device == "cuda":
                    torch.cuda.synchronize()
                best[n] = min(best[n], time.perf_counter() - t0)
                dims[n] = int(feats.shape[1])
    rate = {n: args.n / best[n] for n in names}
    base = names[0]
    print(f"{'extractor':14s} {'dim':>6s} {'images/s':>10s} {'vs ' + base:>14s}")
    for n in names:
        print(f"{n:14s} {dims[n]:6d} {rate[n]:10.2f} {rate[n] / rate[base]:14.3f}")
    import os

    print(json.dumps({"mode": "extractors", "n": args.n, "size": args.size, "batch": args.batch, "device": device,
                      "bf16": bool(args.bf16), "threads": torch.get_num_threads(), "workers": workers,
                      "images_per_s": rate, "ratio_vs_" + base: {n: rate[n] / rate[base] for n in names},
                      "feature_dim": dims, "machine": platform.machine(),
                      "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--extractor", choices=["inception", "tiny"], default="inception")
    ap.add_argument("--extractors", default=None,
                    help="compare these feature extractors instead (comma-separated; the first is the baseline)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the --extractors mode)")
    ap.add_argument("--workers", type=int, default=0, help="data-loader workers (the --extractors mode)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast on cuda (the --extractors mode)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.extractors:
        return compare_extractors(args)
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
