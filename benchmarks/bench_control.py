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
* **Personalisation**: a new subject (the star: the base trains on a world without stars, under
  five labels) taught from 12 star images under the star label by full DreamBooth fine-tuning and by
  LoRA rank 4; scored by detection (imagegen/evaluate/control.py ``subject_scores``): the fraction of
  images generated for the star label in which the world detector finds a star, vs the base, LoRA's
  share of full fine-tuning's gain in that rate and of the trainable parameters, and the drift: the
  single-object GenEval-world accuracy of the other four labels before and after.

The world is the embedded world without stars (the subject is new); the scores are the library's
(imagegen/evaluate/control.py, the evaluation metric ``control`` of ``flows/control.py``).  Training
uses the generic step (models.base.train_step) in-process on scenes rendered here, so the script
needs no curated dataset.  Prints a table and one JSON line.

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

from imagegen.evaluate import control as C  # noqa: E402
from imagegen.train.checkpoint import save_checkpoint  # noqa: E402
from imagegen.world.scene import SHAPES, WorldConfig, render_scene  # noqa: E402
from models.base import train_step  # noqa: E402
from models.controlnet import control_map  # noqa: E402
from models.registry import build_family  # noqa: E402

NET = {"net": "unet", "net_size": "tiny", "image_size": 32,
       "net_overrides": {"model_channels": 32, "channel_mult": [1, 2, 2], "attention_resolutions": [8],
                         "norm_groups": 8, "head_channels": 32}}
MODEL = {**NET, "conditioning": "class", "num_classes": len(SHAPES), "cond_dropout": 0.1}
SUBJECT = "star"
KNOWN = tuple(c for c in SHAPES if c != SUBJECT)
WORLD = WorldConfig(shapes=KNOWN)  # the base never sees the subject


def scenes(start: int, n: int, world: WorldConfig = WORLD) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Scenes ``start..start+n`` at 32 px (from the world's 64 px, as the loader resizes), the label of
    each one's first object, and the ground truth."""
    x, meta = C.held_out_scenes(n, 32, world, start)
    return x, torch.tensor([SHAPES.index(sc.objects[0]["class"]) for sc in meta]), meta


def train(fam, images, labels, steps: int, batch: int, lr: float, seed: int) -> float:
    opt = {"model": torch.optim.AdamW(fam.optimizers_spec()["model"], lr=lr)}
    sched = torch.optim.lr_scheduler.LambdaLR(opt["model"], lambda s: min(1.0, (s + 1) / 20))
    g = torch.Generator().manual_seed(seed)
    fam.train()
    t0 = time.process_time()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        train_step(fam, opt, {"image": images[idx], "label": labels[idx]}, g)
        sched.step()
    fam.eval()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-scenes", type=int, default=1024)
    ap.add_argument("--eval-scenes", type=int, default=64)
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--control-steps", type=int, default=300)
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--subject-images", type=int, default=64, help="images per label when scoring personalisation")
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
            st = C.Settings(steps=args.sample_steps, guidance=2.0, seed=7, batch_size=64)
            ctrl, plain = C.controlnet_scores(cn, xe, me, st)
            res["base"], res["controlnet"] = plain.means(), ctrl.means()

            # inpainting: a free half regenerated under the label of a named shape (GenEval-world)
            inp = C.inpaint_scores(base, xe, me, st, shapes=KNOWN)
            res["inpaint"] = {"max_abs_err_unmasked": inp["max_error"], "geneval": float(np.mean(inp["correct"])),
                              "n": inp["n"]}
            # SDEdit strength sweep: towards another label
            res["sdedit"] = [{"strength": p["strength"], "mse_to_input": float(np.mean(p["distance"])),
                              "target_shape": float(np.mean(p["target"]))}
                             for p in C.sdedit_curve(base, xe, me, st, (0.0, 0.25, 0.5, 0.75, 1.0), shapes=KNOWN)]

        # personalisation: DreamBooth full vs LoRA-4 on the star (never in the base's world), scored by detection
        from models.lora import trainable_fraction
        from models.personalize import dreambooth
        from models.checkpoint import load_family

        star = SHAPES.index(SUBJECT)
        subj, _, _ = scenes(0, 12, WorldConfig(shapes=(SUBJECT,), kind_weights={"single_object": 1.0}))
        st = C.Settings(steps=args.sample_steps, guidance=2.0, seed=11, batch_size=64)
        before = C.subject_scores(base, SUBJECT, args.subject_images, st, others=KNOWN)
        rows = {"base": {"detected": float(np.mean(before["detected"])), "others": float(np.mean(before["others"]))}}
        for name, kw in [("full", {"lr": 5e-4}), ("lora4", {"lora_rank": 4, "lr": 5e-3}),
                         ("lora4_all", {"lora_rank": 4, "lora_targets": "all", "lr": 5e-3})]:
            fam = load_family(ck)
            fam.requires_grad_(True)
            t0 = time.process_time()
            dreambooth(fam, subj, star, steps=args.tune_steps, batch_size=8, **kw)
            cpu = time.process_time() - t0
            after = C.subject_scores(fam, SUBJECT, args.subject_images, st, others=KNOWN)
            rows[name] = {"detected": float(np.mean(after["detected"])), "others": float(np.mean(after["others"])),
                          "trainable": trainable_fraction(fam) if name != "full" else 1.0, "cpu_s": cpu}
            rows[name]["gain"] = rows[name]["detected"] - rows["base"]["detected"]
            rows[name]["drift_other"] = rows[name]["others"] - rows["base"]["others"]
        for name in ("lora4", "lora4_all"):
            rows[name]["share_of_full_gain"] = rows[name]["gain"] / rows["full"]["gain"] if rows["full"]["gain"] > 0 else float("nan")
        res["personalise"] = rows

    if "controlnet" in res:
        b, c = res["base"], res["controlnet"]
        print(f"base {args.base_steps} steps ({res['base_cpu_s']:.0f} CPU-s), ControlNet(boxes) {args.control_steps} steps "
              f"({res['control_cpu_s']:.0f} CPU-s), {args.eval_scenes} held-out scenes, {args.sample_steps} Euler steps, CFG 2")
        print(f"{'':24s}{'mean IoU':>10s}{'IoU>=0.5':>10s}{'position':>10s}{'counting':>10s}")
        for name, r in (("base (no control)", b), ("ControlNet boxes", c)):
            print(f"{name:24s}{r['mean IoU']:10.3f}{r['IoU>=0.5']:10.3f}{r['position']:10.3f}{r['counting']:10.3f}")
        i = res["inpaint"]
        print(f"inpainting: max |err| unmasked {i['max_abs_err_unmasked']:.3g}; GenEval-world of the inpainted object "
              f"(named shape, centre in the regenerated half) {i['geneval']:.2f} over {i['n']} scenes")
        print("SDEdit strength: " + "  ".join(f"{p['strength']:.2f}: mse {p['mse_to_input']:.3f} target {p['target_shape']:.2f}"
                                             for p in res["sdedit"]))
    p = res["personalise"]
    print(f"personalise ({SUBJECT}, new to the base): star detected in {p['base']['detected']:.2f} of the base's images "
          f"for its label; other classes' GenEval-world {p['base']['others']:.2f}")
    print(f"  full: detected {p['full']['detected']:.2f} (gain {p['full']['gain']:+.2f}) drift {p['full']['drift_other']:+.2f}")
    for name in ("lora4", "lora4_all"):
        print(f"  {name}: detected {p[name]['detected']:.2f} (gain {p[name]['gain']:+.2f}, {p[name]['share_of_full_gain']:.0%} "
              f"of full) drift {p[name]['drift_other']:+.2f} with {p[name]['trainable']:.1%} of the parameters")
    print(json.dumps(res, default=float))


if __name__ == "__main__":
    main()
