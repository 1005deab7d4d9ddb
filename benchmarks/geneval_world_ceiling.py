"""GenEval-world validity: the world's own renders score high, noise scores nothing.

Two figures, printed as a table and one JSON line:

* **ceiling** -- the world's renderer draws every GenEval-world prompt (``n_per_prompt`` images
  each), each image is squeezed through an N px bottleneck (bicubic down, as the training loader
  resizes; bicubic back up to the world's size, as ``evaluate`` resizes samples before the world
  detector) and scored with GenEval's rules (FAMILIES.md "Second round", diagnosis (a)).  A
  perfect N px model scores this.
* **noise** -- images no model should pass: uniform RGB noise and gaussian-blurred noise at a few
  sigmas (in pixels of the N px image), drawn at N px and resized up the same way, each scored
  under every single_object prompt and every colors prompt; also N(0, 1) clamped to [-1, 1] (what
  an untrained net's sampler puts out).  Also the largest detection score
  seen on them (GenEval keeps detections above 0.3).
* **noisy renders** (``--pixel-noise``) -- the ceiling's images with gaussian pixel noise of the
  given std (8-bit units) added after the bottleneck: what an imperfect but right model scores.

Not a speed benchmark: it takes no lock.  Run it as
``nice -n 19 .venv/bin/python benchmarks/geneval_world_ceiling.py [--sizes 64 32] [--noise 24]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from imagegen.evaluate import geneval as G
from imagegen.world import geneval as WG
from imagegen.world.scene import WorldConfig


def squeeze(img: Image.Image, n: int, size: int) -> Image.Image:
    if n == size:
        return img
    small = img.resize((n, n), Image.Resampling.BICUBIC)
    return small.resize((size, size), Image.Resampling.BICUBIC)


def score(prompts, images_for, detector) -> dict:
    rows = []
    for i, meta in enumerate(prompts):
        for image in images_for(meta, i):
            ok, _, _ = G.evaluate_image(meta, detector(image), G.detector_color, image)
            rows.append({"tag": meta["tag"], "correct": ok, "metadata": json.dumps(meta, sort_keys=True)})
    s = G.summarize(rows)
    return {"overall": round(s["overall"], 4),
            **{t: round(v["accuracy"], 4) for t, v in s["tasks"].items()}, "images": s["images"]}


def add_noise(img: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    if std <= 0:
        return img
    x = np.asarray(img, np.float32) + rng.normal(0, std, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def ceiling(cfg: WorldConfig, prompts, n: int, per_prompt: int, detector, pixel_noise: float = 0.0) -> dict:
    make = WG.world_prompt_images(cfg)
    rng = np.random.default_rng([1, n, int(pixel_noise * 10)])
    return score(prompts, lambda meta, i: [add_noise(squeeze(im, n, cfg.image_size), pixel_noise, rng)
                                          for im in make(meta, per_prompt, i)], detector)


def noise_images(kind: str, sigma: float, n: int, count: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng([seed, n, int(sigma * 100), ["uniform", "blurred", "normal"].index(kind)])
    out = []
    for _ in range(count):
        if kind == "normal":  # an untrained sampler's output: N(0, 1) clamped to [-1, 1], to 8 bits
            x = (np.clip(rng.normal(0, 1, (n, n, 3)), -1, 1) + 1) * 127.5
        else:
            x = rng.uniform(0, 255, (n, n, 3))
        if sigma > 0:
            x = np.stack([ndi.gaussian_filter(x[..., c], sigma, mode="wrap") for c in range(3)], -1)
            # blurring shrinks the spread; stretch back to the full range as a sampler's output would be
            x = (x - x.mean()) / max(x.std(), 1e-6) * (255 / np.sqrt(12)) + 127.5
        im = Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))
        out.append(im.resize((size, size), Image.Resampling.BICUBIC) if n != size else im)
    return out


def noise(cfg: WorldConfig, prompts, n: int, count: int, sigmas, detector) -> list[dict]:
    single = [p for p in prompts if p["tag"] == "single_object"]
    colors = [p for p in prompts if p["tag"] == "colors"]
    rows = []
    for kind, sigma in [("normal", 0.0)] + [("uniform" if s == 0 else "blurred", s) for s in sigmas]:
        ims = noise_images(kind, sigma, n, count, cfg.image_size, seed=0)
        dets = [detector(im) for im in ims]
        s_ok = [G.evaluate_image(p, d, G.detector_color, im)[0] for p in single for im, d in zip(ims, dets)]
        c_ok = [G.evaluate_image(p, d, G.detector_color, im)[0] for p in colors for im, d in zip(ims, dets)]
        rows.append({"size": n, "noise": kind, "sigma": sigma, "images": count,
                     "single_object": round(float(np.mean(s_ok)), 4), "colors": round(float(np.mean(c_ok)), 4),
                     "max_score": round(max([x.score for d in dets for x in d] or [0.0]), 4),
                     "images_with_det_above_0.3": int(sum(any(x.score > G.THRESHOLD for x in d) for d in dets))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--per-prompt", type=int, default=2)
    ap.add_argument("--noise", type=int, default=24, help="noise images per (size, sigma)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.7, 1.0, 1.5, 2.5])
    ap.add_argument("--skip-ceiling", action="store_true")
    ap.add_argument("--pixel-noise", type=float, nargs="*", default=[],
                    help="also score the ceiling's images with gaussian pixel noise of these stds")
    args = ap.parse_args()
    cfg = WorldConfig()
    prompts = WG.world_prompts(cfg)
    det = WG.WorldDetector()
    load0, t0 = os.getloadavg(), time.time()
    out: dict = {"ceiling": {}, "noise": []}
    for n in args.sizes:
        if not args.skip_ceiling:
            out["ceiling"][n] = ceiling(cfg, prompts, n, args.per_prompt, det)
            print(f"ceiling {n:3d} px: {out['ceiling'][n]}", flush=True)
            for std in args.pixel_noise:
                key = f"{n}+noise{std:g}"
                out["ceiling"][key] = ceiling(cfg, prompts, n, args.per_prompt, det, std)
                print(f"ceiling {n:3d} px + pixel noise std {std:g}: {out['ceiling'][key]}", flush=True)
        for r in noise(cfg, prompts, n, args.noise, args.sigmas, det):
            out["noise"].append(r)
            print(f"noise   {n:3d} px {r['noise']:8s} sigma {r['sigma']:.1f}: single_object {r['single_object']:.3f} "
                  f"colors {r['colors']:.3f} max score {r['max_score']:.3f} "
                  f"({r['images_with_det_above_0.3']}/{r['images']} images with a detection > 0.3)", flush=True)
    out["loadavg_before"], out["loadavg_after"] = load0, os.getloadavg()
    out["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
