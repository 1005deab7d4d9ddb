"""``python -m imagegen.filters``: convert published filter checkpoints to safetensors."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imagegen.filters", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("convert-aesthetic", help="LAION aesthetic predictor .pth -> safetensors")
    a.add_argument("--src", required=True, help="e.g. sac+logos+ava1-l14-linearMSE.pth")
    a.add_argument("--out", required=True)
    a.add_argument("--arch", choices=["mlp", "linear"], default=None, help="default: from the tensors")
    w = sub.add_parser("convert-watermark", help="watermark classifier .pth state dict -> safetensors")
    w.add_argument("--src", required=True, help="e.g. LAION's watermark_model_v1.pt")
    w.add_argument("--out", required=True)
    w.add_argument("--config", default=None, help="WatermarkConfig fields as JSON (default: the LAION preset)")
    args = ap.parse_args(argv)
    from imagegen.filters.base import FilterModelError

    try:
        if args.cmd == "convert-aesthetic":
            from imagegen.filters.aesthetic import convert_checkpoint

            out = convert_checkpoint(args.src, args.out, args.arch)
        else:
            from imagegen.filters.watermark import WatermarkConfig, convert_checkpoint

            fields = json.loads(args.config) if args.config else None
            cfg = WatermarkConfig(weights=args.out, **fields) if fields else WatermarkConfig.laion(args.out)
            out = convert_checkpoint(args.src, args.out, cfg)
    except (FilterModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
