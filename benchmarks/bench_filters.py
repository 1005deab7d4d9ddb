"""Throughput of the content filters (imagegen.filters) and SemDeDup on this machine's CPU.

Each filter scores the same world images (planted content included, decoded as the download stage
stores them) with one worker process and its default batch size; the model load is excluded
(done once per process in a pipeline).  A bare decode loop over the same bytes is the baseline of
the same run, so figures from a loaded machine can be read as ratios.  The aesthetic predictor is
timed on its MLP over 768-d embeddings (the CLIP ViT-L/14 embedding, not available offline here,
is the expensive part and is the CLIP filters' cost); the watermark classifier runs LAION's
architecture (EfficientNet-B3 + MLP head, 256 px) with random weights, which costs what the real
weights cost.  SemDeDup runs on synthetic clustered 768-d unit embeddings.

    .venv/bin/python benchmarks/bench_filters.py --n 400 --semdedup-n 100000 --json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from imagegen.stages.download import DownloadConfig, normalize_image  # noqa: E402
from imagegen.stages.filter import FilterInput  # noqa: E402
from imagegen.world.publish import BLOCKLIST_FILE, PublishConfig, publish_world  # noqa: E402
from imagegen.world.scene import WorldConfig  # noqa: E402


def world_images(n: int, size: int, folder: Path) -> tuple[list[bytes], Path]:
    pub = PublishConfig(n_images=n, nsfw_rate=0.02, text_rate=0.02, blocklisted_rate=0.02)
    publish_world(WorldConfig(image_size=size), pub, folder)
    dl = DownloadConfig(image_size=size)
    out = []
    for f in sorted((folder / "files").iterdir()):
        r = normalize_image(f.read_bytes(), dl)
        if r["ok"]:
            out.append(r["image"])
    return out, folder / BLOCKLIST_FILE


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="world base scenes")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--semdedup-n", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from imagegen.filters.aesthetic import build_predictor, predict
    from imagegen.filters.blocklist import HashBlocklistConfig, HashBlocklistFilter
    from imagegen.filters.nsfw import NudeNetConfig, NudeNetFilter
    from imagegen.filters.ocr import OcrConfig, OcrFilter
    from imagegen.filters.watermark import WatermarkConfig, WatermarkFilter, build_classifier
    from imagegen.semdedup import SemDedupConfig, semdedup

    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        blobs, blocklist = world_images(args.n, args.size, tmp / "world")
        n = len(blobs)

        def fresh() -> FilterInput:
            d = FilterInput(table=__import__("pandas").DataFrame({"key": [str(i) for i in range(n)]}), image_bytes=blobs)
            d.images  # decoded once, as the stage does, outside the filter timing
            return d

        t = timed(lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs], args.repeats)
        res["decode (baseline)"] = {"images_per_s": n / t}
        data = fresh()
        filters = {
            "nsfw_nudenet": NudeNetFilter(NudeNetConfig(threads=args.threads)),
            "text_ocr": OcrFilter(OcrConfig(threads=args.threads)),
            "hash_blocklist": HashBlocklistFilter(HashBlocklistConfig(path=str(blocklist))),
        }
        wm_path = tmp / "wm.safetensors"
        wcfg = WatermarkConfig.laion(str(wm_path), batch_size=32)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in build_classifier(wcfg).state_dict().items()}, str(wm_path))
        filters["watermark_classifier (LAION arch)"] = WatermarkFilter(wcfg)
        for name, f in filters.items():
            f.score(FilterInput(table=data.table.iloc[:4], image_bytes=blobs[:4]))  # model load + warm-up
            t = timed(lambda: f.score(data), args.repeats)
            res[name] = {"images_per_s": n / t}
        aes = tmp / "aes.safetensors"
        save_file(build_predictor("mlp", 768).state_dict(), str(aes))
        emb = np.random.default_rng(0).normal(size=(20_000, 768)).astype(np.float32)
        predict(aes, "mlp", emb[:8])
        t = timed(lambda: predict(aes, "mlp", emb), args.repeats)
        res["aesthetic (MLP only, on embeddings)"] = {"images_per_s": len(emb) / t}
        m = args.semdedup_n
        rng = np.random.default_rng(1)
        centres = rng.normal(size=(max(1, m // 500), 768))
        x = centres[rng.integers(len(centres), size=m)] + 1.5 * rng.normal(size=(m, 768))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        keys = [f"{i:09d}" for i in range(m)]
        for backend in ("numpy", "faiss"):
            try:
                t0 = time.perf_counter()
                _, c = semdedup(x, keys, SemDedupConfig(backend=backend))
                res[f"semdedup ({backend}, {m} x 768)"] = {"images_per_s": m / (time.perf_counter() - t0),
                                                           "clusters": c["clusters"]}
            except ImportError:
                pass
    base = res["decode (baseline)"]["images_per_s"]
    for v in res.values():
        v["images_per_s"] = round(v["images_per_s"], 1)
        v["vs_decode"] = round(v["images_per_s"] / base, 4)
    load = os.getloadavg()
    meta = {"images": n, "size": args.size, "threads": args.threads, "cpus": os.cpu_count(),
            "loadavg_1m": round(load[0], 2)}
    if args.json:
        print(json.dumps({"meta": meta, "results": res}))
    else:
        print(meta)
        for k, v in res.items():
            print(f"{k:40s} {v['images_per_s']:>10.1f} img/s  ({v['vs_decode']:.4f}x decode)")


if __name__ == "__main__":
    main()
