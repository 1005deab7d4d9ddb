"""Inception features end to end on a GPU (decode, clean resize, forward) at large batch.

For the lent H100/H200: how many images/s a FID pass sustains, split into its parts, and what a
50k-image FID costs.  Goal: >= 5,000 images/s end to end on an H100 (FIELD-NOTES: Inception
forward alone ~5.4k img/s on an H200; decoding and resizing dominate a 50k FID).

* data: ``--n`` PNGs of ``--size`` px rendered from the embedded world into a temp folder,
  decoded and resized to 299x299 with PIL bicubic (clean-fid's ``clean`` mode) in ``--workers``
  DataLoader processes;
* network: clean-fid's Inception torchscript when its weights file is present (offline machines:
  see docs/EVALUATE.md), else torchvision's Inception-v3 with random weights (same architecture
  and FLOPs: throughput does not depend on weight values; the output says which);
* rows: decode+resize alone (CPU pipeline), forward alone on a resident batch (fp32 and, with
  ``--bf16``, bf16 autocast), end to end;
* DINOv2 rows (FD-DINOv2, Stein et al. 2023): forward alone of DINOv2 at 224x224 through the
  project's extractor (:class:`imagegen.evaluate.dinov2.Dinov2Extractor`: ImageNet normalisation,
  CLS after the final norm), the ``--dinov2`` folder's weights when given, else a randomly
  initialised ViT-L/14 config (``--dinov2-layers`` shrinks it for a CPU smoke run; timing only).
  ``--no-dinov2`` leaves them out.  Without CUDA the script runs on CPU (``--device cpu``) and
  refuses ``--device cuda`` with a clear message.

    python benchmarks/gpu_fid_throughput.py --n 20000 --batch 500 --workers 16 --bf16 --out $OUT/fid.json
    python benchmarks/gpu_fid_throughput.py --device cpu --n 64 --batch 16 --workers 0 --dinov2-layers 2  # CPU smoke
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


class Folder(torch.utils.data.Dataset):
    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        im = Image.open(self.files[i]).convert("RGB").resize((299, 299), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def network(device: torch.device) -> tuple[torch.nn.Module, str]:
    from pathlib import Path as P

    ts = P(tempfile.gettempdir()) / "inception-2015-12-05.pt"
    if ts.is_file():
        from cleanfid.features import build_feature_extractor

        real = build_feature_extractor("clean", device=device, use_dataparallel=False)

        class Real(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return real(x.float())  # clean-fid's extractor takes float pixels in 0..255

        return Real(), "clean-fid Inception (real)"
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    net = net.eval().to(device).to(memory_format=torch.channels_last)

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return net((x.float() / 127.5) - 1.0)

    class Wrap(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fwd(x)

    return Wrap(), "torchvision Inception-v3, random weights (timing only)"


def dinov2_network(device: torch.device, path: str | None, layers: int) -> tuple[torch.nn.Module, str]:
    from imagegen.evaluate.dinov2 import Dinov2Extractor

    if path:
        return Dinov2Extractor(path, str(device)), f"DINOv2 {path}"
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, mlp_ratio=4,
                       patch_size=14, image_size=224)  # ViT-L/14 (24 layers), as dgm-eval / Stein et al.
    name = f"DINOv2 ViT-L/14 config, {layers} layers, random weights (timing only)"
    return Dinov2Extractor(model=Dinov2Model(cfg), name="vitl14-random", device=str(device)), name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dinov2", default=None, help="a DINOv2 save_pretrained folder (default: random ViT-L/14)")
    ap.add_argument("--dinov2-layers", type=int, default=24, help="layers of the random DINOv2 (24 = ViT-L/14)")
    ap.add_argument("--no-dinov2", action="store_true", help="leave the DINOv2 rows out")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_fid_throughput: --device cuda but no CUDA device is available here; run it with "
                 "--device cpu (a smoke run: --n 64 --batch 16 --workers 0 --dinov2-layers 2)")
    device = torch.device(args.device)
    from imagegen.world.scene import WorldConfig, render_scene

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = []
        for i in range(min(args.n, 256)):  # 256 distinct scenes, repeated as files
            _, im = render_scene(WorldConfig(), i)
            base.append(im.resize((args.size, args.size), Image.Resampling.BICUBIC))
        files = []
        for i in range(args.n):
            p = Path(tmp) / f"{i:06d}.png"
            base[i % len(base)].save(p, compress_level=1)
            files.append(p)
        prep_s = time.perf_counter() - t0
        loader = torch.utils.data.DataLoader(Folder(files), batch_size=args.batch, num_workers=args.workers,
                                             pin_memory=device.type == "cuda", persistent_workers=False)
        net, which = network(device)
        rows = {}
        t0 = time.perf_counter()
        for _ in loader:
            pass
        rows["decode+resize (CPU workers)"] = args.n / (time.perf_counter() - t0)
        x = torch.randint(0, 256, (args.batch, 3, 299, 299), dtype=torch.uint8, device=device)
        for label, ctx in [("forward fp32", None), ("forward bf16", "bf16")] if args.bf16 else [("forward fp32", None)]:
            with torch.no_grad():
                auto = torch.autocast(device.type, dtype=torch.bfloat16) if ctx else torch.autocast(device.type,
                                                                                                     enabled=False)
                with auto:
                    net(x)
                    sync(device)
                    reps = max(1, min(20, args.n // args.batch))
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        net(x)
                    sync(device)
            rows[label] = reps * args.batch / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        feats = 0
        with torch.no_grad(), (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else
                               torch.autocast(device.type, enabled=False)):
            for batch in loader:
                feats += net(batch.to(device, non_blocking=True)).shape[0]
        sync(device)
        e2e = feats / (time.perf_counter() - t0)
        rows["end to end"] = e2e
        dino_which = None
        if not args.no_dinov2:
            dino, dino_which = dinov2_network(device, args.dinov2, args.dinov2_layers)
            xd = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8, device=device).float()
            for label, bf16 in [("DINOv2 forward fp32", False)] + ([("DINOv2 forward bf16", True)] if args.bf16 else []):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    dino(xd)
                    sync(device)
                    reps = max(1, min(20, args.n // args.batch))
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        dino(xd)
                    sync(device)
                rows[label] = reps * args.batch / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; network: {which}; n={args.n} batch={args.batch} workers={args.workers}"
          + (f"; DINOv2: {dino_which}" if dino_which else ""))
    for k, v in rows.items():
        print(f"{k:30s} {v:10.0f} images/s")
    print(f"50k-image FID pass (end to end): {50000 / e2e:.1f} s   (file preparation {prep_s:.1f} s, not counted)")
    out = {"device": name, "network": which, "dinov2": dino_which, "n": args.n, "batch": args.batch, "workers": args.workers,
           "bf16": args.bf16, "images_per_s": rows, "fid50k_seconds": 50000 / e2e}
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
