"""The control benchmark on the embedded world (issue 16): the evaluation metric ``control``.

Every score is against the world's ground truth on held-out scenes (scene indices from
:data:`HELD_OUT_START` on, which no curated or test dataset reaches), generated images read by the
world's pixel detector (imagegen/world/detector.py) at the world's image size, as GenEval-world does:

* **ControlNet** (a ``controlnet`` run): the scenes' control maps (the run's own signal, from the
  scene pixels at the model's size) given to the ControlNet, and the same noise and prompts without
  control (the base).  Detector boxes of the generated objects against the scene's boxes (best IoU
  per ground-truth object: ``Control mean IoU``, ``Control IoU>=0.5``), GenEval-world position
  accuracy (position scenes: both classes detected in the scene's relation) and counting accuracy
  (counting scenes: as many objects of the class as the scene has); the uncontrolled values carry
  ``(no control)``.
* **Inpainting** (any family :mod:`models.editing` edits, and the trained ``inpainting`` family):
  on scenes with a half (left, right, top or bottom) free of objects, that half is regenerated under a prompt naming one object
  (text: ``"a photo of a <colour> <shape>"``; class-conditioned: the shape's label).
  ``Control inpaint unmasked max error``: max |output - input| outside the mask (0 for pixel
  families); ``Control inpaint GenEval``: the fraction where the detector finds the named object
  (class, and colour when the prompt names one) with its centre in the regenerated half.
* **SDEdit** (the same families): the strength sweep towards another prompt (the first object's
  shape changed): ``Control SDEdit distance s=S`` (mean squared distance to the input) and
  ``Control SDEdit target s=S`` (the detector's first object has the target shape).
* **Personalisation** (:func:`subject_scores`): the detection rate of a new subject (a world shape
  class the base never trained on) in images prompted with it, and the GenEval-world single-object
  accuracy of the other classes (the drift of personalising).

Accuracies carry bootstrap intervals over scenes (imagegen/evaluate/uncertainty.py).
:func:`control_rows` is the metric table's compute function; ``flows/control.py`` runs it for a
base run and its controls and writes the leaderboard; ``benchmarks/bench_control.py`` prints the
same figures for models it trains in-process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

HELD_OUT_START = 1_000_000
SDEDIT_STRENGTHS = (0.25, 0.5, 0.75)
# Detections below this score are dropped: the world's rendered objects score >= 0.9, the blobs the
# detector finds in an untrained model's noisy samples at most ~0.55 (measured on 200 of them), and a
# looser cut lets noise pass as any class (GenEval's own 0.3 cut is meant for a trained detector).
MIN_SCORE = 0.6
PREFIX = "Control "  # every result name; lower is better for the metric table's lower_columns, higher for the rest


# ----------------------------------------------------------------------------- scenes and images


def held_out_scenes(n: int, size: int, world: Any = None, start: int = HELD_OUT_START) -> tuple[Tensor, list[Any]]:
    """``n`` world scenes from index ``start`` on: images [n, 3, size, size] in [-1, 1] (bicubic from
    the world's size, as the loader resizes) and their ground truth."""
    from imagegen.world.scene import WorldConfig, render_scene

    world = world or WorldConfig()
    imgs, scenes = [], []
    for i in range(start, start + n):
        sc, im = render_scene(world, i)
        im = im.convert("RGB")
        if im.size[0] != size:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        imgs.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
        scenes.append(sc)
    return torch.stack(imgs), scenes


def world_uint8(images: Tensor, world_size: int) -> list[np.ndarray]:
    """[B, 3, H, W] in [-1, 1] -> uint8 HWC arrays at the world's size (the detector's input)."""
    u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if u8.shape[1] == world_size:
        return list(u8)
    return [np.asarray(Image.fromarray(a).resize((world_size, world_size), Image.Resampling.BICUBIC)) for a in u8]


def detections(image: np.ndarray, min_score: float = MIN_SCORE) -> list[Any]:
    """The world detector's objects in ``image`` (uint8, the world's size) scoring >= ``min_score``."""
    from imagegen.world.detector import detect

    return [d for d in detect(image, with_masks=False) if d.score >= min_score]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class LayoutScores:
    """Per-item scores of a generated set against its scenes (lists, for means and intervals)."""

    ious: list[float]        # best IoU of each ground-truth object
    position: list[float]    # one per position scene: 1 if the relation holds between the detections
    counting: list[float]    # one per counting scene: 1 if the count of the class is right

    def means(self) -> dict[str, float]:
        m = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
        return {"mean IoU": m(self.ious), "IoU>=0.5": m([float(v >= 0.5) for v in self.ious]),
                "position": m(self.position), "counting": m(self.counting)}


def layout_scores(generated: Sequence[np.ndarray], scenes: Sequence[Any]) -> LayoutScores:
    """Detections in ``generated`` (uint8 at the scenes' size) against the scenes' objects."""
    from imagegen.world.scene import geneval_relations

    out = LayoutScores([], [], [])
    for g, sc in zip(generated, scenes):
        got = detections(g)
        for o in sc.objects:
            out.ious.append(max((iou(o["box"], d.box) for d in got), default=0.0))
        if sc.kind == "position":
            a, b = sc.objects[sc.relation["a"]]["class"], sc.objects[sc.relation["b"]]["class"]
            da = [d for d in got if d.class_name == a]
            db = [d for d in got if d.class_name == b]
            out.position.append(float(bool(da and db and sc.relation["relation"] in geneval_relations(da[0].box, db[0].box))))
        if sc.kind == "counting":
            want = sc.objects[0]["class"]
            out.counting.append(float(sum(d.class_name == want for d in got) == len(sc.objects)))
    return out


# ----------------------------------------------------------------------------- conditioning and sampling


def pixel_size(family: Any) -> int:
    """The side of the images a family makes (decoded, for latent families)."""
    if hasattr(family, "_pixel_size"):
        return int(family._pixel_size())
    if getattr(family.cfg, "data", "pixels") == "pixels":
        return int(family.cfg.image_size)
    from models.editing import autoencoder

    return int(autoencoder(family).cfg.image_size)


def prompt_for(family: Any, objects: list[dict[str, Any]]) -> Any:
    """What conditions ``family`` on ``objects``: their GenEval caption (text), the first object's
    shape label (class-conditioned on the world's shapes), None (unconditional)."""
    from imagegen.world.scene import SHAPES, caption_for

    cond = getattr(family.cfg, "conditioning", "none")
    if cond == "text":
        return caption_for(objects)
    if cond == "class":
        if int(family.cfg.num_classes) != len(SHAPES):
            raise ValueError(f"a class-conditioned model is prompted with the world's shapes: it needs "
                             f"num_classes={len(SHAPES)} ({list(SHAPES)}), this one has {family.cfg.num_classes}")
        return SHAPES.index(objects[0]["class"])
    return None


def batch_conditioning(family: Any, prompts: list[Any]) -> Any:
    if not prompts or prompts[0] is None:
        return None
    if isinstance(prompts[0], int):
        return torch.tensor(prompts, dtype=torch.long)
    return list(prompts)


def noise(seed: int, n: int, shape: tuple[int, ...], offset: int = 0) -> Tensor:
    """Per-item starting noise: item i's noise depends only on (seed, offset + i)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + offset + i))
                        for i in range(n)])


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


# ----------------------------------------------------------------------------- the scores


@dataclass
class Settings:
    """The sampling of every generated image (the evaluation request's fields)."""

    sampler: str | None = None
    steps: int | None = None
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 64


def controlnet_scores(cn: Any, images: Tensor, scenes: list[Any], s: Settings, scale: float | None = None
                      ) -> tuple[LayoutScores, LayoutScores]:
    """(controlled, uncontrolled) layout scores of ControlNet ``cn`` on ``images`` / ``scenes``: the
    same noise and prompts, with the scenes' control maps and without."""
    world_size = scenes[0].image_size
    text = getattr(cn.cfg, "conditioning", "none") == "text"
    prompts = [sc.caption if text else prompt_for(cn, sc.objects) for sc in scenes]
    dev = cn.device
    z = noise(s.seed, len(scenes), tuple(cn.noise_shape))
    ctrl, plain = [], []
    for sl in _batches(len(scenes), s.batch_size):
        hint = cn.control_map(images[sl].to(dev))
        cond = batch_conditioning(cn, prompts[sl])
        n = hint.shape[0]
        kw = dict(sampler=s.sampler, steps=s.steps, guidance=s.guidance, x_T=z[sl].to(dev))
        with torch.no_grad():
            plain.append(cn.sample(n, cond, generator=torch.Generator(dev).manual_seed(s.seed), **kw).cpu())
            ctrl.append(cn.sample(n, cond, generator=torch.Generator(dev).manual_seed(s.seed), control=hint,
                                  control_scale=scale, **kw).cpu())
    return (layout_scores(world_uint8(torch.cat(ctrl), world_size), scenes),
            layout_scores(world_uint8(torch.cat(plain), world_size), scenes))


HALVES = {"left": (0, 0, 0.5, 1), "right": (0.5, 0, 1, 1), "top": (0, 0, 1, 0.5), "bottom": (0, 0.5, 1, 1)}


def free_half(scene: Any) -> str | None:
    """A half of the scene (``left``, ``right``, ``top``, ``bottom``, first that fits) no object box
    reaches; None when every half holds some object."""
    S = scene.image_size
    for name, (x0, y0, x1, y1) in HALVES.items():
        if all(o["box"][2] <= x0 * S or o["box"][0] >= x1 * S or o["box"][3] <= y0 * S or o["box"][1] >= y1 * S
               for o in scene.objects):
            return name
    return None


def half_mask(half: str, side: int) -> Tensor:
    """[side, side] {0, 1}: 1 on ``half``."""
    x0, y0, x1, y1 = (round(v * side) for v in HALVES[half])
    m = torch.zeros(side, side)
    m[y0:y1, x0:x1] = 1
    return m


def in_half(box: Sequence[float], half: str, side: int) -> bool:
    """Whether the centre of ``box`` lies in ``half`` of a ``side``-pixel image."""
    x0, y0, x1, y1 = HALVES[half]
    cx, cy = (box[0] + box[2]) / 2 / side, (box[1] + box[3]) / 2 / side
    return x0 <= cx < x1 and y0 <= cy < y1


def inpaint_targets(scenes: list[Any], seed: int = 0, shapes: Sequence[str] | None = None,
                    colours: Sequence[str] | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    """(scene position, free half, the object to inpaint there) for every scene with a free half;
    the objects cycle through ``shapes`` and draw from ``colours`` (default the world's; reproducible
    from ``seed``)."""
    from imagegen.world.scene import COLORS, SHAPES

    rng = np.random.default_rng(seed)
    out = []
    pool = tuple(shapes or SHAPES)
    colours = list(colours or COLORS)
    for i, sc in enumerate(scenes):
        side = free_half(sc)
        if side is None:
            continue
        k = len(out)
        out.append((i, side, {"class": pool[k % len(pool)], "color": colours[int(rng.integers(len(colours)))]}))
    return out


def _inpaint(fam: Any, images: Tensor, mask: Tensor, cond: Any, s: Settings, z: Tensor) -> Tensor:
    if getattr(fam, "name", None) == "inpainting":  # the trained inpainting family: its own sampling
        return fam.sample(images.shape[0], cond, sampler=s.sampler, steps=s.steps, guidance=s.guidance,
                          x_T=z, image=images, mask=mask, generator=torch.Generator(fam.device).manual_seed(s.seed))
    from models.editing import inpaint

    return inpaint(fam, images, mask, cond, sampler=s.sampler, steps=s.steps, guidance=s.guidance, noise=z,
                   generator=torch.Generator(fam.device).manual_seed(s.seed)).sample


def inpaint_scores(fam: Any, images: Tensor, scenes: list[Any], s: Settings,
                   shapes: Sequence[str] | None = None) -> dict[str, Any]:
    """GenEval-world accuracy of inpainted objects and the preservation of the unmasked pixels.

    Returns ``correct`` (per inpainted scene: 1 if the named object is detected with its centre in the
    regenerated half), ``max_error`` (max |output - input| outside the masks), ``n`` and whether the
    prompts name colours (``colour``: text models)."""

    targets = inpaint_targets(scenes, s.seed, shapes)
    if not targets:
        raise ValueError("no held-out scene has a half free of objects to inpaint; use more scenes")
    side = images.shape[-1]
    world_size = scenes[0].image_size
    text = getattr(fam.cfg, "conditioning", "none") == "text"
    dev = fam.device
    z_all = noise(s.seed + 1, len(targets), tuple(fam.noise_shape))
    correct, max_err = [], 0.0
    for sl in _batches(len(targets), s.batch_size):
        part = targets[sl]
        x = images[[t[0] for t in part]].to(dev)
        mask = torch.stack([half_mask(half, side) for _, half, _ in part])[:, None].to(dev)
        cond = batch_conditioning(fam, [prompt_for(fam, [t[2]]) for t in part])
        with torch.no_grad():
            out = _inpaint(fam, x, mask, cond, s, z_all[sl].to(dev))
        keep = (mask == 0).expand_as(out)
        max_err = max(max_err, float((out - x).abs()[keep].max()))
        for (_, half, obj), arr in zip(part, world_uint8(out, world_size)):
            ok = False
            for d in detections(arr):
                if in_half(d.box, half, world_size) and d.class_name == obj["class"] and (not text or d.color == obj["color"]):
                    ok = True
                    break
            correct.append(float(ok))
    return {"correct": correct, "max_error": max_err, "n": len(correct), "colour": text}


def sdedit_curve(fam: Any, images: Tensor, scenes: list[Any], s: Settings,
                 strengths: Sequence[float] = SDEDIT_STRENGTHS, shapes: Sequence[str] | None = None
                 ) -> list[dict[str, Any]]:
    """The SDEdit strength sweep towards a changed prompt (the first object's shape replaced by the
    next of ``shapes``, default the world's): per strength the mean squared distance to the input and the per-scene hits
    (the detector's first detection has the target shape)."""
    from imagegen.world.scene import SHAPES
    from models.editing import sdedit

    world_size = scenes[0].image_size
    shapes = tuple(shapes or SHAPES)
    targets = []
    for sc in scenes:
        objs = [dict(o) for o in sc.objects]
        new = shapes[(shapes.index(objs[0]["class"]) + 1) % len(shapes)]
        for o in objs:
            if o["class"] == objs[0]["class"]:
                o["class"] = new
        targets.append((new, prompt_for(fam, objs) if sc.kind != "position" else prompt_for(fam, objs[:1])))
    dev = fam.device
    z = noise(s.seed + 2, len(scenes), tuple(fam.noise_shape))
    curve = []
    for strength in strengths:
        dist, hits = [], []
        for sl in _batches(len(scenes), s.batch_size):
            x = images[sl].to(dev)
            cond = batch_conditioning(fam, [t[1] for t in targets[sl]])
            with torch.no_grad():
                out = sdedit(fam, x, strength, cond, sampler=s.sampler, steps=s.steps, guidance=s.guidance,
                             noise=z[sl].to(dev), generator=torch.Generator(dev).manual_seed(s.seed))
            dist += ((out - x) ** 2).flatten(1).mean(1).cpu().tolist()
            for (new, _), arr in zip(targets[sl], world_uint8(out, world_size)):
                d = detections(arr)
                hits.append(float(bool(d) and d[0].class_name == new))
        curve.append({"strength": float(strength), "distance": dist, "target": hits})
    return curve


def subject_scores(fam: Any, subject: str, n: int, s: Settings, others: Sequence[str] | None = None,
                   colour: str | None = None, prompt: Any = None) -> dict[str, Any]:
    """Personalisation scored by detection: ``n`` images prompted with the subject (``prompt``, default
    the subject's label / caption) and the fraction where the world detector finds an object of shape
    ``subject`` (and ``colour``, when given); plus, for each class of ``others`` (default the other
    world shapes), ``n`` images of it and the fraction where the detector's first object has that
    shape (the single-object GenEval-world accuracy: compare before and after to see drift)."""
    from imagegen.world.scene import SHAPES

    if subject not in SHAPES:
        raise ValueError(f"the subject is scored by the world detector: a world shape {list(SHAPES)}, got {subject!r}")
    others = [c for c in SHAPES if c != subject] if others is None else list(others)
    world_size = 64
    dev = fam.device

    def generate(p: Any, k: int, offset: int) -> list[np.ndarray]:
        z = noise(s.seed + 3, k, tuple(fam.noise_shape), offset)
        outs = []
        for sl in _batches(k, s.batch_size):
            m = sl.stop - sl.start
            cond = batch_conditioning(fam, [p] * m)
            with torch.no_grad():
                outs.append(fam.sample(m, cond, sampler=s.sampler, steps=s.steps, guidance=s.guidance,
                                       x_T=z[sl].to(dev), generator=torch.Generator(dev).manual_seed(s.seed)).cpu())
        return world_uint8(torch.cat(outs), world_size)

    obj = {"class": subject, **({"color": colour} if colour else {})}
    p = prompt_for(fam, [obj]) if prompt is None else prompt
    found = [float(any(d.class_name == subject and (colour is None or d.color == colour)
                       for d in detections(a))) for a in generate(p, n, 0)]
    acc: list[float] = []
    for j, c in enumerate(others):
        for a in generate(prompt_for(fam, [{"class": c}]), n, 10_000 * (j + 1)):
            d = detections(a)
            acc.append(float(bool(d) and d[0].class_name == c))
    return {"detected": found, "others": acc}


# ----------------------------------------------------------------------------- the metric


def _row(prov: dict[str, Any], metric: str, values: list[float] | float, req: Any, **extra: Any) -> dict[str, Any]:
    from imagegen.evaluate.uncertainty import interval_columns

    if isinstance(values, list):
        v = float(np.mean(values)) if values else float("nan")
        ci = interval_columns(values, None, req, kind="mean") if values else {}
        return {**prov, "metric": metric, "value": v, "n_items": len(values), **ci, **extra}
    return {**prov, "metric": metric, "value": float(values), **extra}


def editable(fam: Any) -> bool:
    """Whether :mod:`models.editing` edits this family (the DDPM, EDM, consistency and flow families
    and their students, pixel or latent; not the one-step DMD generator), or it is the trained
    inpainting family."""
    from models.consistency import ConsistencyFunction
    from models.ddpm import DDPM
    from models.dmd import DMD
    from models.edm import EDM
    from models.flow import FlowMatching

    if getattr(fam, "name", None) == "inpainting":
        return True
    return isinstance(fam, (DDPM, EDM, FlowMatching, ConsistencyFunction)) and not isinstance(fam, DMD)


def control_rows(src: Any, req: Any, ctx: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The metric table's compute function of ``control`` (see the module docstring)."""
    if src.run is None:
        return [], {"control": "the control benchmark generates from a run (a base run, a ControlNet run, "
                               "an inpainting run or a personalised run); not a folder or a diffusers model"}
    fam = src.load(ctx.device)
    fam.eval()
    s = Settings(req.sampler, req.steps, req.guidance, req.seed, req.batch_size)
    size = pixel_size(fam)
    images, scenes = held_out_scenes(int(req.control_scenes), size)
    prov = {**ctx.base, "implementation": "imagegen control benchmark (issue 16): world detector vs the scenes' "
            "ground truth", "detector": "world", "min_score": MIN_SCORE, "n_scenes": len(scenes), "first_scene": HELD_OUT_START}
    rows: list[dict[str, Any]] = []
    if getattr(fam, "name", None) == "controlnet":
        ctrl, plain = controlnet_scores(fam, images, scenes, s)
        prov = {**prov, "signal": fam.cfg.signal, "base": fam.cfg.base}
        for label, sc in (("", ctrl), (" (no control)", plain)):
            rows += [_row(prov, f"{PREFIX}mean IoU{label}", sc.ious, req),
                     _row(prov, f"{PREFIX}IoU>=0.5{label}", [float(v >= 0.5) for v in sc.ious], req),
                     _row(prov, f"{PREFIX}position{label}", sc.position, req),
                     _row(prov, f"{PREFIX}counting{label}", sc.counting, req)]
        return rows, {}
    if getattr(fam, "name", None) == "personalize":
        return personalize_rows(fam, prov, req, s)
    if not editable(fam):
        return [], {"control": f"family {getattr(fam, 'name', '?')!r} has no editing (diffusion / flow families do)"}
    inp = inpaint_scores(fam, images, scenes, s)
    rows += [_row(prov, f"{PREFIX}inpaint unmasked max error", inp["max_error"], req),
             _row(prov, f"{PREFIX}inpaint GenEval", inp["correct"], req, prompts_name_colour=inp["colour"])]
    if getattr(fam, "name", None) != "inpainting":
        for pt in sdedit_curve(fam, images, scenes, s):
            rows += [_row(prov, f"{PREFIX}SDEdit distance s={pt['strength']:g}", pt["distance"], req),
                     _row(prov, f"{PREFIX}SDEdit target s={pt['strength']:g}", pt["target"], req)]
    return rows, {}


def personalize_rows(fam: Any, prov: dict[str, Any], req: Any, s: Settings) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """A personalised run (family ``personalize``): its subject's detection rate in images prompted
    with its ``prompt``, the same for its base, and the drift (the base's GenEval-world single-object
    accuracy of the other shapes minus the run's)."""
    from models.checkpoint import load_family

    c = fam.cfg
    if c.subject is None:
        return [], {"control": "the personalised run names no subject (model.subject: the world shape it teaches)"}
    n = int(req.control_scenes)
    after = subject_scores(fam, c.subject, n, s, prompt=c.prompt)
    base = load_family(c.base, device=fam.device)
    before = subject_scores(base, c.subject, n, s, prompt=c.prompt)
    prov = {**prov, "subject": c.subject, "method": c.method, "prompt": json.dumps(c.prompt)}
    drift = float(np.mean(before["others"]) - np.mean(after["others"])) if after["others"] else float("nan")
    return [_row(prov, f"{PREFIX}subject detection", after["detected"], req),
            _row(prov, f"{PREFIX}subject detection (base)", before["detected"], req),
            _row(prov, f"{PREFIX}other classes", after["others"], req),
            _row(prov, f"{PREFIX}drift", drift, req),
            _row(prov, f"{PREFIX}trainable fraction", float(fam.trainable_fraction), req)], {}


def check_request(req: Any, src: Any) -> None:
    """The ``control`` metric's checks before any work (raises ValueError naming the problem)."""
    from imagegen.world.scene import SHAPES
    from models.registry import get_family

    if src.run is None:
        raise ValueError("metric 'control' generates from a run (a base, ControlNet or inpainting run), "
                         "not from a folder or a diffusers model")
    model = src.train_cfg.model or {}
    family = src.train_cfg.family
    cls = get_family(family)
    if family == "personalize" and not model.get("subject"):
        raise ValueError(f"metric 'control': personalised run {src.run.id} names no subject (model.subject: the "
                         "world shape it teaches, which the detector looks for)")
    if family not in ("controlnet", "personalize"):
        from models.consistency import ConsistencyFunction
        from models.ddpm import DDPM
        from models.dmd import DMD
        from models.edm import EDM
        from models.flow import FlowMatching

        if family != "inpainting" and (not issubclass(cls, (DDPM, EDM, FlowMatching, ConsistencyFunction))
                                       or issubclass(cls, DMD)):
            raise ValueError(f"metric 'control': run {src.run.id} is a {family!r} model; the control benchmark "
                             "scores ControlNet runs, trained inpainting runs and the families models/editing.py "
                             "edits (DDPM, EDM, flow, consistency and their students; not DMD)")
    if model.get("conditioning") == "class" and int(model.get("num_classes") or 0) != len(SHAPES):
        raise ValueError(f"metric 'control': run {src.run.id} is class-conditioned with {model.get('num_classes')} "
                         f"classes; its prompts are the world's shapes, so it needs num_classes={len(SHAPES)} "
                         f"({list(SHAPES)})")
