"""The control benchmark on the embedded world, at a small CPU budget: a class-conditioned flow base
(tiny U-Net, 32 px) and its controls, scored against the world's ground truth by the pixel detector.

Rows (all on held-out scenes the models never trained on, same noise for every variant):

* **ControlNet (boxes)**: detector boxes of the generated objects against the control map's boxes
  (mean best IoU per control box, fraction with IoU >= 0.5), GenEval-world position accuracy
  (position scenes: the relation between the two detected objects) and counting accuracy
  (counting scenes: number of detections), with vs without control (the base).
* **Inpainting**: max |error| of the unmasked pixels after decoding (0 for a pixel family), and
  the detection rate of an object inside the regenerated half.
* **SDEdit**: the strength sweep as a curve: mean squared distance to the input vs the fraction
  whose detected first shape is the target label's (prompt alignment).
* **Personalisation**: a new subject (a striped ring, never in the world) under the circle label:
  gain in held-out denoising loss for full DreamBooth fine-tuning and for LoRA rank 4, LoRA's share
  of the trainable parameters, and drift on the other classes' images.

Training uses the generic step (models.base.train_step) in-process on scenes rendered here, so the
script needs no curated dataset.  Prints a table and one JSON line.

    nice -n 10 .venv/bin/python benchmarks/bench_control.py [--base-steps 300] [--control-steps 300] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.train.checkpoint import save_checkpoint  # noqa: E402
from imagegen.world.detector import detect  # noqa: E402
from imagegen.world.scene import SHAPES, WorldConfig, geneval_relations, render_scene  # noqa: E402
from models.base import train_step  # noqa: E402
from models.controlnet import control_map  # noqa: E402
from models.editing import inpaint, sdedit  # noqa: E402
from models.registry import build_family  # noqa: E402

NET = {"net": "unet", "net_size": "tiny", "image_size": 32,
       "net_overrides": {"model_channels": 32, "channel_mult": [1, 2, 2], "attention_resolutions": [8],
                         "norm_groups": 8, "head_channels": 32}}
MODEL = {**NET, "conditioning": "class", "num_classes": len(SHAPES), "cond_dropout": 0.1}


def scenes(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    world = WorldConfig(image_size=32)
    imgs, labels, meta = [], [], []
    for i in range(start, start + n):
        sc, im = render_scene(world, i)
        imgs.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
        labels.append(SHAPES.index(sc.objects[0]["class"]))
        meta.append(sc)
    return torch.stack(imgs), torch.tensor(labels), meta


def uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def train(fam, images, labels, steps: int, batch: int, lr: float, seed: int) -> float:
    opt = {"model": torch.optim.AdamW(fam.optimizers_spec()["model"], lr=lr)}
    sched = torch.optim.lr_scheduler.LambdaLR(opt["model"], lambda s: min(1.0, (s + 1) / 20))
    g = torch.Generator().manual_seed(seed)
    fam.train()
    t0, loss = time.process_time(), 0.0
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        out = train_step(fam, opt, {"image": images[idx], "label": labels[idx]}, g)
        sched.step()
        loss = 0.9 * loss + 0.1 * out.logs["loss"] if loss else out.logs["loss"]
    fam.eval()
    return time.process_time() - t0


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def layout_scores(generated: torch.Tensor, sources: torch.Tensor, meta: list) -> dict[str, float]:
    ious, pos_ok, pos_n, cnt_ok, cnt_n = [], 0, 0, 0, 0
    for g, s, sc in zip(uint8(generated), uint8(sources), meta):
        want, got = detect(s, with_masks=False), detect(g, with_masks=False)
        for w in want:
            ious.append(max((iou(w.box, d.box) for d in got), default=0.0))
        if sc.kind == "position":
            pos_n += 1
            a, b = sc.objects[0]["class"], sc.objects[1]["class"]
            da = [d for d in got if d.class_name == a]
            db = [d for d in got if d.class_name == b]
            if da and db and sc.relation["relation"] in geneval_relations(da[0].box, db[0].box):
                pos_ok += 1
        if sc.kind == "counting":
            cnt_n += 1
            cnt_ok += sum(d.class_name == sc.objects[0]["class"] for d in got) == len(sc.objects)
    ious_a = np.asarray(ious) if ious else np.zeros(1)
    return {"mean_iou": float(ious_a.mean()), "iou50": float((ious_a >= 0.5).mean()),
            "position_acc": pos_ok / max(pos_n, 1), "counting_acc": cnt_ok / max(cnt_n, 1),
            "position_n": pos_n, "counting_n": cnt_n}


def ring_images(n: int, seed: int) -> torch.Tensor:
    """The new subject: a striped two-colour ring on a gray background (not a world shape)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(10, 22, 2)
        r = np.hypot(yy - cy, xx - cx)
        ring = (r > 4.0) & (r < 8.5)
        img = np.full((32, 32, 3), 0.5 + rng.uniform(-0.1, 0.1))
        stripes = ((xx + yy) // 3) % 2 == 0
        img[ring & stripes] = (0.9, 0.2, 0.9)
        img[ring & ~stripes] = (0.1, 0.8, 0.3)
        out.append(torch.from_numpy((img * 2 - 1).astype(np.float32)).permute(2, 0, 1))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-scenes", type=int, default=1024)
    ap.add_argument("--eval-scenes", type=int, default=64)
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--control-steps", type=int, default=300)
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only-personalise", action="store_true", help="train the base, then only the personalisation rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y, _ = scenes(0, args.train_scenes)
    xe, ye, me = scenes(100_000, args.eval_scenes)
    res: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        base = build_family("flow", MODEL)
        res["base_cpu_s"] = train(base, x, y, args.base_steps, args.batch, 2e-3, 0)
        ck = save_checkpoint(Path(tmp) / "base", args.base_steps, family=base, optimizers={}, schedulers={}, ema=None,
                             config={"family": "flow", "model": MODEL}, generator_states={}, trainer_state={}, keep=1)
        if not args.only_personalise:
            cn = build_family("controlnet", {**MODEL, "base": str(ck), "signal": "boxes"})
            t0 = time.process_time()
            hints = control_map(x, "boxes")  # computed once here: the same maps loss() computes per batch
            res["control_map_cpu_s"] = time.process_time() - t0
            opt = {"model": torch.optim.AdamW(cn.optimizers_spec()["model"], lr=1e-3)}
            g = torch.Generator().manual_seed(1)
            cn.train()
            t0 = time.process_time()
            for _ in range(args.control_steps):
                idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)
                opt["model"].zero_grad(set_to_none=True)
                with cn.controlling(hints[idx], 1.0):
                    out = cn.base.loss({"image": x[idx], "label": y[idx]}, g)
                out.losses["model"].backward(inputs=opt["model"].param_groups[0]["params"])
                opt["model"].step()
            cn.eval()
            res["control_cpu_s"] = time.process_time() - t0
            z = torch.randn(xe.shape, generator=torch.Generator().manual_seed(7))
            hint_e = control_map(xe, "boxes")
            plain = cn.sample(len(xe), ye, steps=args.sample_steps, guidance=2.0, x_T=z)
            ctrl = cn.sample(len(xe), ye, steps=args.sample_steps, guidance=2.0, x_T=z, control=hint_e)
            res["base"], res["controlnet"] = layout_scores(plain, xe, me), layout_scores(ctrl, xe, me)

            # inpainting: regenerate the right half under the scene's label
            mask = torch.zeros(1, 1, 32, 32)
            mask[..., 16:] = 1
            inp = inpaint(base, xe, mask, ye, steps=args.sample_steps, guidance=2.0, noise=z).sample
            keep = mask[0, 0] == 0
            found = [any(d.box[0] >= 14 for d in detect(a, with_masks=False)) for a in uint8(inp)]
            truth = [any(o["box"][0] >= 14 for o in sc.objects) for sc in me]
            res["inpaint"] = {"max_abs_err_unmasked": float((inp[:, :, keep] - xe[:, :, keep]).abs().max()),
                              "object_in_right_half": float(np.mean(found)), "truth_rate": float(np.mean(truth))}

            # SDEdit strength sweep: towards another label
            target = (ye + 1) % len(SHAPES)
            curve = []
            for s in (0.0, 0.25, 0.5, 0.75, 1.0):
                out = sdedit(base, xe, s, target, steps=args.sample_steps, guidance=2.0, noise=z)
                hits = [bool(d) and d[0].class_name == SHAPES[int(t)]
                        for d, t in zip((detect(a, with_masks=False) for a in uint8(out)), target)]
                curve.append({"strength": s, "mse_to_input": float(((out - xe) ** 2).mean()), "target_shape": float(np.mean(hits))})
            res["sdedit"] = curve

        # personalisation: DreamBooth full vs LoRA-4 on the ring under the circle label
        from models.lora import trainable_fraction
        from models.personalize import denoising_loss, dreambooth
        from models.checkpoint import load_family

        circle = SHAPES.index("circle")
        subj, held = ring_images(12, 0), ring_images(16, 1)
        others = xe[ye != circle][:32]
        other_y = ye[ye != circle][:32]
        b_subj, b_other = denoising_loss(base, held, circle), denoising_loss(base, others, other_y)
        rows = {}
        for name, kw in [("full", {"lr": 5e-4}), ("lora4", {"lora_rank": 4, "lr": 5e-3}),
                         ("lora4_all", {"lora_rank": 4, "lora_targets": "all", "lr": 5e-3})]:
            fam = load_family(ck)
            fam.requires_grad_(True)
            t0 = time.process_time()
            dreambooth(fam, subj, circle, steps=args.tune_steps, batch_size=8, **kw)
            rows[name] = {"gain": b_subj - denoising_loss(fam, held, circle),
                          "drift_other": denoising_loss(fam, others, other_y) - b_other,
                          "trainable": trainable_fraction(fam) if name != "full" else 1.0,
                          "cpu_s": time.process_time() - t0}
        for name in ("lora4", "lora4_all"):
            rows[name]["share_of_full_gain"] = rows[name]["gain"] / rows["full"]["gain"] if rows["full"]["gain"] > 0 else float("nan")
        res["personalise"] = rows

    if "controlnet" in res:
        b, c = res["base"], res["controlnet"]
        print(f"base {args.base_steps} steps ({res['base_cpu_s']:.0f} CPU-s), ControlNet(boxes) {args.control_steps} steps "
              f"({res['control_cpu_s']:.0f} CPU-s), {args.eval_scenes} held-out scenes, {args.sample_steps} Euler steps, CFG 2")
        print(f"{'':24s}{'mean IoU':>10s}{'IoU>=0.5':>10s}{'position':>10s}{'counting':>10s}")
        for name, r in (("base (no control)", b), ("ControlNet boxes", c)):
            print(f"{name:24s}{r['mean_iou']:10.3f}{r['iou50']:10.3f}{r['position_acc']:10.3f}{r['counting_acc']:10.3f}")
        i = res["inpaint"]
        print(f"inpainting: max |err| unmasked {i['max_abs_err_unmasked']:.3g}; object detected in the regenerated half "
              f"{i['object_in_right_half']:.2f} (scenes with one there: {i['truth_rate']:.2f})")
        print("SDEdit strength: " + "  ".join(f"{p['strength']:.2f}: mse {p['mse_to_input']:.3f} target {p['target_shape']:.2f}"
                                             for p in res["sdedit"]))
    p = res["personalise"]
    print(f"personalise (ring): full gain {p['full']['gain']:.4f} drift {p['full']['drift_other']:+.4f}")
    for name in ("lora4", "lora4_all"):
        print(f"  {name}: gain {p[name]['gain']:.4f} ({p[name]['share_of_full_gain']:.0%} of full) drift "
              f"{p[name]['drift_other']:+.4f} with {p[name]['trainable']:.1%} of the parameters")
    print(json.dumps(res, default=float))


if __name__ == "__main__":
    main()
