"""The ``imagegen import`` sub-command (kept here so imagegen/cli.py stays a table of commands)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_import_parser(sub: Any) -> None:
    im = sub.add_parser("import", help="register an image folder, WebDataset tars or a Hugging Face dataset as a "
                        "dataset, or precomputed FID statistics (.npz) as an FID reference")
    im.add_argument("kind", choices=["folder", "webdataset", "hf", "fid-stats"],
                    help="folder (class sub-folders = labels), webdataset (tar path/pattern/URL list or an "
                    "img2dataset folder), hf (save_to_disk folder or cached dataset name), fid-stats (.npz)")
    im.add_argument("source", help="the folder, tar pattern, HF dataset, or .npz file")
    im.add_argument("--name", help="registry name")
    im.add_argument("--curate", action="store_true", help="run the dedup and filter stages (else: as-is)")
    im.add_argument("--captions", help="folder: a captions.jsonl of {file, caption} (default <folder>/captions.jsonl)")
    im.add_argument("--labels", choices=["auto", "subfolders", "none"], help="folder: class sub-folders as labels")
    im.add_argument("--image-column", help="hf: image column")
    im.add_argument("--caption-column", help="hf: caption column")
    im.add_argument("--label-column", help="hf: label column")
    im.add_argument("--split", help="hf: split")
    im.add_argument("--label-field", help="webdataset: .json field holding the label")
    im.add_argument("--protocol", help="fid-stats: what the statistics are (e.g. 'clean-fid clean, CIFAR-10 "
                    "train 50k, 32px')")
    im.add_argument("--mode", help="fid-stats: the clean-fid mode they match (clean, legacy_tensorflow, legacy_pytorch)")
    im.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any import parameter, e.g. --set shard.target_shard_size=500 --set filter.min_side=16")
    im.add_argument("--data-root", default=None, help="data root (default $IMAGEGEN_DATA_ROOT or ./imagegen-data)")
    im.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")


def build_config(args: argparse.Namespace) -> Any:
    from imagegen.importers import ImportConfig
    from imagegen.presets import build_config as build

    source = args.source if args.kind == "hf" or "://" in args.source or "{" in args.source or "*" in args.source \
        else str(Path(args.source).resolve())
    base: dict[str, Any] = {"kind": args.kind, "source": source}
    for field in ("name", "captions", "labels", "image_column", "caption_column", "label_column", "split", "label_field"):
        value = getattr(args, field, None)
        if value is not None:
            base[field] = str(Path(value).resolve()) if field == "captions" else value
    if args.curate:
        base["curate"] = True
    return build(ImportConfig, {"cli": base}, "cli", list(args.overrides))


def cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.paths import data_root

    root = data_root(args.data_root)
    if args.kind == "fid-stats":
        from imagegen.importers.fid_stats import import_fid_stats

        kw = dict(a.split("=", 1) for a in args.overrides)  # mu_key=..., sigma_key=..., extractor=...
        unknown = set(kw) - {"mu_key", "sigma_key", "extractor"}
        if unknown:
            raise ValueError(f"fid-stats takes --set mu_key=/sigma_key=/extractor= only, not {sorted(unknown)}")
        card = import_fid_stats(root, args.source, args.name, protocol=args.protocol, mode=args.mode, **kw)
        return {"fid_ref_id": card["id"], "name": card["name"], "path": card["path"], "feature_dim": card["feature_dim"],
                "file_sha256": card["file_sha256"],
                "message": f"FID reference {card['name']} ({card['id']}): {card['feature_dim']}-d statistics of "
                           f"{card['file_name']} (sha256 {card['file_sha256'][:16]}); use it with "
                           f"`imagegen evaluate ... --set reference_stats={card['name']}`"}
    from imagegen.importers import import_dataset

    cfg = build_config(args)
    res = import_dataset(cfg, root, progress=lambda msg: print(msg, file=sys.stderr))
    c = res.counts
    return {**res.model_dump(), "samples": c["shard"]["samples"], "shards": c["shard"]["shards"],
            "message": f"dataset {res.name} ({res.dataset_id}): {c['shard']['samples']} samples in "
                       f"{c['shard']['shards']} shards at {res.path}; outcomes {c['accounting']}"
                       + (" (already imported)" if res.cached else "")}
