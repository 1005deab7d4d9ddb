"""LPIPS, the learned perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric"), as an optional loss term for autoencoders.

    d(x, y) = sum_l  mean_{h,w}  || w_l * (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|) ||^2

f_l: activations of layer l of a frozen backbone after a fixed input scaling; each is unit-
normalised over channels; w_l: learned non-negative per-channel weights (a 1x1 convolution); the
squared, weighted difference is averaged over space and summed over layers.  Backbones: VGG-16
(taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 — the one latent-diffusion autoencoders use)
and AlexNet (relu1..relu5), with torchvision's architectures; ``tiny`` is a three-stage conv
stack this project builds for tests and CPU runs (no published weights; not a metric).

Weights are one safetensors file (metadata ``format=imagegen-lpips``, ``backbone=...``): nothing
is downloaded and nothing is unpickled at load time.  To use the published LPIPS on a machine
that has them, convert once:

    python -m imagegen.perceptual convert --backbone vgg16 \\
        --backbone-weights ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth \\
        --lin-weights <lpips package>/weights/v0.1/vgg.pth --out lpips-vgg16.safetensors

(torchvision's ImageNet state dict and the LPIPS package's linear layers; both are read with
torch's ``weights_only`` loader, the only place this module touches a pickle, and only for files
the user points at), then set ``perceptual: lpips-vgg16.safetensors`` in the autoencoder config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

FORMAT = "imagegen-lpips"
# Input scaling of the LPIPS reference implementation (its ScalingLayer): (x - shift) / scale
# for x in [-1, 1], roughly ImageNet normalisation re-expressed for that range.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _vgg16() -> nn.Sequential:
    from torchvision.models import vgg16

    return vgg16(weights=None).features


def _alexnet() -> nn.Sequential:
    from torchvision.models import alexnet

    return alexnet(weights=None).features


def _tiny() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())


# name -> (feature extractor builder, indices of the layers whose outputs are tapped, their channels)
BACKBONES: dict[str, tuple[Callable[[], nn.Sequential], tuple[int, ...], tuple[int, ...]]] = {
    "vgg16": (_vgg16, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
    "alexnet": (_alexnet, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "tiny": (_tiny, (1, 4, 7), (8, 16, 32)),
}


class LPIPSError(ValueError):
    """A perceptual-weights file that cannot be used (says which and why)."""


class LPIPS(nn.Module):
    """Frozen LPIPS distance: ``forward(x, y)`` -> one distance per image, x and y in [-1, 1]."""

    def __init__(self, backbone: str = "vgg16") -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise LPIPSError(f"unknown LPIPS backbone {backbone!r}; one of {sorted(BACKBONES)}")
        build, taps, channels = BACKBONES[backbone]
        self.backbone = backbone
        self.features = build()[: taps[-1] + 1]
        self.taps = taps
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen, also inside a module put in training mode

    def _taps(self, x: Tensor) -> list[Tensor]:
        out, taps = [], set(self.taps)
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in taps:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise LPIPSError(f"LPIPS takes two RGB batches of one shape [B, 3, H, W]; got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        # both images in one pass through the backbone
        feats = self._taps(torch.cat([x, y]))
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for f, lin in zip(feats, self.lins):
            f = f.float()
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fx, fy = f.chunk(2)
            total = total + lin((fx - fy).pow(2)).mean((1, 2, 3))
        return total


def save_lpips(model: LPIPS, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "backbone": model.backbone})
    return path


def load_lpips(path: str | Path, device: str | torch.device = "cpu") -> LPIPS:
    """The LPIPS distance from a safetensors file written by ``save_lpips``/``convert``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise LPIPSError(f"perceptual weights {path} do not exist; write them with `python -m imagegen.perceptual "
                         "convert ...` (see imagegen/perceptual.py) on a machine that has the LPIPS weights")
    if path.suffix != ".safetensors":
        raise LPIPSError(f"perceptual weights {path}: only .safetensors files are loaded (a .pth/.pt would run "
                         "torch's unpickler); convert it with `python -m imagegen.perceptual convert`")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise LPIPSError(f"perceptual weights {path} are not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise LPIPSError(f"perceptual weights {path} lack metadata format={FORMAT!r} (got {meta or 'none'}); "
                         "write them with save_lpips or `python -m imagegen.perceptual convert`")
    model = LPIPS(meta.get("backbone", "?"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LPIPSError(f"perceptual weights {path} do not fit the {model.backbone} LPIPS: missing "
                         f"{list(missing)[:4]}, unexpected {list(unexpected)[:4]}")
    if any(float(lin.weight.min()) < 0 for lin in model.lins):
        raise LPIPSError(f"perceptual weights {path}: LPIPS layer weights must be non-negative")
    return model.to(device)


def convert(backbone: str, backbone_weights: str | Path, lin_weights: str | Path, out: str | Path) -> Path:
    """Published weights -> one safetensors file: torchvision's ImageNet state dict of the backbone
    (``features.N.*`` keys) and the LPIPS package's linear layers (``linK.model.1.weight``, or
    ``linK.weight``).  Both are read with ``torch.load(weights_only=True)`` (tensors only)."""
    model = LPIPS(backbone)

    def read(p: str | Path) -> dict[str, Tensor]:
        p = Path(p).expanduser()
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        return torch.load(p, map_location="cpu", weights_only=True)

    sd: dict[str, Tensor] = {}
    bb = read(backbone_weights)
    for k in model.features.state_dict():
        src = f"features.{k}"
        if src not in bb:
            raise LPIPSError(f"{backbone_weights}: no tensor {src!r} for the {backbone} backbone")
        sd[f"features.{k}"] = bb[src]
    lins = read(lin_weights)
    for i in range(len(model.lins)):
        w = next((lins[k] for k in (f"lin{i}.model.1.weight", f"lin{i}.weight", f"lins.{i}.weight") if k in lins), None)
        if w is None:
            raise LPIPSError(f"{lin_weights}: no weights for LPIPS layer {i} (lin{i}.model.1.weight)")
        sd[f"lins.{i}.weight"] = w
    model.load_state_dict(sd)
    return save_lpips(model, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m imagegen.perceptual", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    cv = sub.add_parser("convert", help="published LPIPS weights -> one safetensors file")
    cv.add_argument("--backbone", choices=sorted(set(BACKBONES) - {"tiny"}), default="vgg16")
    cv.add_argument("--backbone-weights", required=True, help="torchvision ImageNet state dict (.pth/.safetensors)")
    cv.add_argument("--lin-weights", required=True, help="LPIPS linear layers (the lpips package's weights/v0.1/*.pth)")
    cv.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = convert(args.backbone, args.backbone_weights, args.lin_weights, args.out)
    print(json.dumps({"out": str(out), "backbone": args.backbone}))


if __name__ == "__main__":
    main()
