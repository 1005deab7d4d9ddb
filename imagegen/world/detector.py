"""A pixel-only detector for the synthetic world: finds coloured shapes on a neutral gray background.

It never sees a scene's ground truth; it reads the image.  It serves two jobs: recaptioning world
images (the ``world_detector`` captioner) and, later, GenEval-style scoring of generated images,
so its output is general: per object a class, a colour, a box, a confidence score and a mask.

Method, in order:

1. **Background.**  Backgrounds are neutral grays, plain or lightly textured; every palette colour
   is saturated or very dark/light.  Pixels that are gray (low chroma, mid value) and not next to
   a non-gray pixel are background samples; a normalised Gaussian convolution of those samples
   gives a smooth background field, so gradients and blotches are followed.
2. **Colour-aware seeds.**  An antialiased or JPEG-blurred pixel is, to first order, a mix
   ``bg + a * (colour - bg)``.  For each palette colour we compute that coverage ``a`` (projection)
   and the distance off the bg->colour segment, in YCbCr with chroma down-weighted (JPEG keeps
   luma at full resolution, chroma at half); each pixel takes the colour whose segment it lies
   closest to.  Seeds are 4-connected regions with ``a > 0.6`` per colour, so touching objects of
   different colours never merge, and the 2-px gaps between same-coloured objects (whose JPEG
   ringing reaches ``a ~ 0.2-0.45``) still separate them.
3. **Objects.**  Seeds below a speck size are dropped; each remaining seed grows into nearby
   foreground pixels (nearest seed wins).  The colour is the nearest palette colour to the median
   of the eroded core (edges are where JPEG chroma subsampling bleeds).  The mask/box are the
   pixels with coverage > 0.5 along the object's own colour.  A small fragment whose mask touches
   a 3x larger object is a JPEG halo (ringing reads as a lighter/darker hue) and is dropped.
4. **Shape.**  Scale-free features of the soft coverage: fill ratio of the box, the normalised
   second moment ``(mu20 + mu02) / A^2`` (circle 1/(2 pi), square 1/6, then cross, triangle,
   star), vertical skewness (the triangle is the only bottom-heavy shape) and the angular
   harmonics ``|sum a r^2 e^{ik theta}| / sum a r^2`` for k = 3, 4, 5 (triangle, square/cross,
   star symmetry; they survive blur far better than the box-based fill).  Templates are the
   same features measured on the world's own renderer (four sizes, two colours, clean and JPEG);
   the shape of the nearest template wins.
5. **Score.**  ``sqrt(shape_conf * colour_conf) * fit * on_background`` with
   ``conf = 1 - d_best / d_second_label`` (near 1 when the object sits on a template, near 0 when
   two labels are equally likely).  The two confidences are relative, so a blob far from every
   template could still be "confidently" its nearest one; two absolute factors reject what is not
   one of the world's shapes (``fit`` and ``on_background``, 1 on every world render measured,
   see FIT_DISTANCE and RING_BACKGROUND):
   ``fit`` decays linearly from 1 to 0 as the feature distance to the nearest template of any
   shape goes beyond what the world's own renders show; ``on_background`` asks that the ring 2-3
   px outside the object's mask be the world's background (world objects lie on a gray
   background, at least 2 px from each other), as no blob of noise is.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from imagegen.world import scene as world

# Segmentation constants (8-bit RGB units / coverage fractions).
GRAY_MAX_CHROMA = 24.0     # max-min channel spread of a background sample
GRAY_VALUE_RANGE = (55.0, 205.0)
FG_MIN_DISTANCE = 28.0     # |pixel - background| for a pixel to count as foreground at all
SEED_COVERAGE = 0.6        # coverage of a seed pixel along its colour direction
MASK_COVERAGE = 0.5        # coverage of a mask pixel (defines the box, as the renderer's pixels)
SEGMENT_TOLERANCE = 45.0   # max distance off the bg->colour segment for a colour assignment
GROW_RADIUS = 3.0          # px a seed may grow into foreground pixels

# Absolute plausibility of a candidate (step 5).  Measured 2026-12-04 over 2,432 objects of world
# renders (every GenEval-world prompt x 2 at 64 px and squeezed through 32 px with bicubic, 300 scene
# renders clean / JPEG q85 / q80, 30 textured JPEG q80; benchmarks/geneval_world_ceiling.py draws
# the same): distance to the nearest template at most 3.23 (99.9th pct 2.79), ring background
# fraction at least 0.55.  Blobs of uniform and gaussian-blurred RGB noise scoring > 0.3 before
# these factors (2,062 of them, 32/64 px): ring background fraction at most 0.29 (99th pct 0.13).
FIT_DISTANCE = (3.5, 7.0)        # fit = 1 up to the first, 0 from the second (template units)
RING_BACKGROUND = (0.3, 0.5)     # on_background = 0 up to the first, 1 from the second
RING_PX = (2, 3)                 # the ring: pixels this far (dilation steps) outside the mask


@dataclass
class Detection:
    """One object: ``box`` is ``[x0, y0, x1, y1]`` in pixels with x1/y1 exclusive (as the world's)."""

    class_name: str
    color: str
    box: list[int]
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)
    features: dict[str, float] = field(default_factory=dict, repr=False)

    def as_object(self) -> dict[str, Any]:
        """The world's object dict (``class``, ``color``, ``box``) for caption_for and comparisons."""
        return {"class": self.class_name, "color": self.color, "box": list(self.box)}


# ----------------------------------------------------------------------------------- background


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"detect needs an RGB image (H, W, 3), got array shape {x.shape}")
    if min(x.shape[:2]) < 8:
        raise ValueError(f"image {x.shape[1]}x{x.shape[0]} is too small to detect objects in (min 8 px)")
    return x.astype(np.float32)


def estimate_background(x: np.ndarray) -> np.ndarray:
    """Smooth HxWx3 background field from the gray pixels (see module doc, step 1)."""
    h, w, _ = x.shape
    mean, chroma = x.mean(axis=2), x.max(axis=2) - x.min(axis=2)
    gray = (chroma <= GRAY_MAX_CHROMA) & (mean >= GRAY_VALUE_RANGE[0]) & (mean <= GRAY_VALUE_RANGE[1])
    gray &= ~ndi.binary_dilation(~gray)  # antialiased rims of dark/light objects look gray too
    if gray.sum() < 0.05 * h * w:
        # no neutral gray to speak of: fall back to the border median
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        return np.broadcast_to(np.median(border, axis=0), x.shape).astype(np.float32)
    sigma = max(2.0, min(h, w) / 16)
    weight = ndi.gaussian_filter(gray.astype(np.float32), sigma)
    field_ = np.stack([ndi.gaussian_filter(x[..., c] * gray, sigma) for c in range(3)], axis=-1)
    fallback = np.median(x[gray], axis=0)
    ok = weight > 0.02
    return np.where(ok[..., None], field_ / np.maximum(weight, 1e-6)[..., None], fallback).astype(np.float32)


# ---------------------------------------------------------------------------------- segmentation


def _palette() -> tuple[list[str], np.ndarray]:
    names = list(world.COLORS)
    return names, np.array([world.COLORS[n] for n in names], dtype=np.float32)


# JPEG stores chroma at half resolution (4:2:0) but luma at full resolution, so coverage is
# measured in YCbCr with the chroma axes down-weighted: objects that differ from the background in
# brightness keep sharp edges, and objects that differ only in hue (green on mid gray) still count.
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                  dtype=np.float32)
CHROMA_WEIGHT = 0.5  # scale of the Cb/Cr axes relative to Y


def _weighted(x: np.ndarray) -> np.ndarray:
    """RGB -> YCbCr with chroma scaled by CHROMA_WEIGHT (offsets dropped: only differences matter)."""
    return (x @ _YCBCR.T) * np.array([1.0, CHROMA_WEIGHT, CHROMA_WEIGHT], dtype=np.float32)


def _coverage_and_colour(x: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the foreground pixels: index of the palette colour whose bg->colour segment is nearest,
    the coverage along it and the distance off it (weighted YCbCr space).  Elsewhere -1, 0, inf."""
    _, pal = _palette()
    h, w, _ = x.shape
    idx, cov, dist = np.full((h, w), -1), np.zeros((h, w), np.float32), np.full((h, w), np.inf, np.float32)
    if not fg.any():
        return idx, cov, dist
    xf, bf = x[fg], bg[fg]                                   # N 3
    r = _weighted(xf - bf)                                   # N 3
    v = _weighted(pal[None, :, :] - bf[:, None, :])          # N K 3
    vv = np.maximum((v * v).sum(-1), 1e-6)
    a = np.clip((r[:, None, :] * v).sum(-1) / vv, 0.0, 1.0)  # N K
    off = np.linalg.norm(r[:, None, :] - a[..., None] * v, axis=-1)
    best = off.argmin(axis=1)
    rows = np.arange(len(best))
    idx[fg], cov[fg], dist[fg] = best, a[rows, best], off[rows, best]
    return idx, cov, dist


def _segments(x: np.ndarray, bg: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Boolean region per object candidate (see module doc, steps 2-3)."""
    fg = np.linalg.norm(x - bg, axis=2) > FG_MIN_DISTANCE
    colour_idx, cover, off = _coverage_and_colour(x, bg, fg)
    seeds = np.zeros(x.shape[:2], dtype=np.int32)
    n = 0
    for k in np.unique(colour_idx[fg]):
        strong = (colour_idx == k) & (cover > SEED_COVERAGE) & (off < SEGMENT_TOLERANCE) & fg
        lab, m = ndi.label(strong)  # 4-connectivity: diagonal touches do not join objects
        if m == 0:
            continue
        sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, m + 1))
        for j in np.flatnonzero(sizes >= max(4, min_area // 2)) + 1:
            n += 1
            seeds[lab == j] = n
    if n == 0:
        return []
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    grown = np.where(fg & (dist <= GROW_RADIUS), seeds[iy, ix], 0)
    return [grown == i for i in range(1, n + 1)]


# -------------------------------------------------------------------------------------- features


def _soft_coverage(x: np.ndarray, bg: np.ndarray, region: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Fraction of each pixel covered by an object of ``colour`` (projection on bg -> colour)."""
    v = _weighted(colour[None, None, :] - bg)
    a = (_weighted(x - bg) * v).sum(-1) / np.maximum((v * v).sum(-1), 1e-6)
    return np.clip(a, 0.0, 1.0) * region


def shape_features(cover: np.ndarray) -> dict[str, float] | None:
    """Scale-free shape features of a soft coverage map (None if it has no pixel above 0.5)."""
    hard = cover > MASK_COVERAGE
    if not hard.any():
        return None
    ys, xs = np.nonzero(hard)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = float(cover.sum())
    yy, xx = np.mgrid[0:cover.shape[0], 0:cover.shape[1]]
    cy, cx = float((cover * yy).sum() / area), float((cover * xx).sum() / area)
    mu20 = float((cover * (xx - cx) ** 2).sum() / area)
    mu02 = float((cover * (yy - cy) ** 2).sum() / area)
    mu03 = float((cover * (yy - cy) ** 3).sum() / area)
    dx, dy = xx - cx, yy - cy
    r2 = cover * (dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    harm = {f"h{k}": float(abs((r2 * np.exp(1j * k * theta)).sum()) / max(r2.sum(), 1e-9)) for k in (3, 4, 5)}
    return {
        "fill": area / float((x1 - x0) * (y1 - y0)),
        "moment": (mu20 + mu02) / area,           # (mu20 + mu02) / A^2 with mu as sums
        "skew": mu03 / max(mu02, 1e-6) ** 1.5,
        "aspect": float(x1 - x0) / float(y1 - y0),
        **harm,
    }


# Weights turning feature differences into comparable units (about one JPEG-noise std each).
FEATURE_SCALES = {"fill": 0.06, "moment": 0.006, "skew": 0.12, "h3": 0.05, "h4": 0.05, "h5": 0.08}
# Templates: each shape drawn by the world's renderer at four sizes (fractions of the image side),
# in a colour with strong luminance contrast and one with almost none, clean and JPEG-encoded
# (small shapes lose their points to JPEG blur; a blurred star must look like a blurred star).
TEMPLATE_FRACTIONS = (0.2, 0.25, 0.31, 0.38)
TEMPLATE_COLOURS = ("blue", "green")
TEMPLATE_JPEG_QUALITY = (None, 85)


@dataclass
class _Candidate:
    region: np.ndarray
    mask: np.ndarray
    rgb: np.ndarray
    features: dict[str, float]


def _candidates(x: np.ndarray, min_area: int) -> list[_Candidate]:
    """Segment, then measure each object candidate; rejects specks and JPEG halos."""
    bg = estimate_background(x)
    h, w, _ = x.shape
    cands: list[_Candidate] = []
    for region in _segments(x, bg, min_area):
        ys, xs = np.nonzero(region)
        win = (slice(max(ys.min() - 1, 0), ys.max() + 2), slice(max(xs.min() - 1, 0), xs.max() + 2))
        reg, xw, bw = region[win], x[win], bg[win]
        core = ndi.binary_erosion(reg)
        if core.sum() < 4:
            core = reg
        rgb = np.median(xw[core], axis=0)
        cover = _soft_coverage(xw, bw, reg, rgb)
        if (cover > MASK_COVERAGE).sum() < min_area:
            continue
        feats = shape_features(cover)
        if feats is None:
            continue
        feats["area"] = float(cover.sum())
        mask = np.zeros((h, w), dtype=bool)
        mask[win] = cover > MASK_COVERAGE
        feats["ring_background"] = _ring_background(x, bg, mask)
        cands.append(_Candidate(region, mask, rgb, feats))
    # A fragment glued to a much larger object of another colour is a JPEG halo of that object
    # (world objects keep >= 2 px apart, so real neighbours never touch after a 1-px dilation).
    keep = []
    for c in cands:
        grown = ndi.binary_dilation(c.mask)
        halo = any(o is not c and o.features["area"] >= 3 * c.features["area"] and (grown & o.mask).any()
                   for o in cands)
        if not halo:
            keep.append(c)
    return keep


def _ring_background(x: np.ndarray, bg: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the pixels RING_PX outside ``mask`` that are background (within FG_MIN_DISTANCE
    of the background field); 0 when the ring is empty (the mask fills the image)."""
    pad = RING_PX[1] + 1
    ys, xs = np.nonzero(mask)
    win = (slice(max(ys.min() - pad, 0), ys.max() + pad + 1), slice(max(xs.min() - pad, 0), xs.max() + pad + 1))
    m = mask[win]
    ring = ndi.binary_dilation(m, iterations=RING_PX[1]) & ~ndi.binary_dilation(m, iterations=RING_PX[0] - 1)
    if not ring.any():
        return 0.0
    near = np.linalg.norm(x[win][ring] - bg[win][ring], axis=1) <= FG_MIN_DISTANCE
    return float(near.mean())


def _ramp(v: float, lo: float, hi: float) -> float:
    """0 at or below ``lo``, 1 at or above ``hi``, linear between."""
    return float(np.clip((v - lo) / (hi - lo), 0.0, 1.0))


def _template_image(shape: str, colour: str, side: int, image_size: int, quality: int | None) -> np.ndarray:
    cfg = world.WorldConfig(image_size=image_size)
    x0 = (image_size - side) // 2
    sc = world.Scene(index=0, kind="single_object", caption="",
                     objects=[{"class": shape, "color": colour, "box": [x0, x0 + 1, x0 + side, x0 + side + 1]}],
                     relation=None, background={"type": "plain", "gray": 128, "tint": [0, 0, 0]},
                     image_size=image_size)
    img = world.render(sc, cfg)
    if quality is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(img, dtype=np.float32)


@functools.lru_cache(maxsize=4)
def shape_templates(image_size: int = 64) -> dict[str, list[dict[str, float]]]:
    """Feature vectors of each shape rendered by the world (a vocabulary of templates, not the
    ground truth of any image being detected), measured with the detector's own pipeline."""
    out: dict[str, list[dict[str, float]]] = {}
    min_area = max(6, round(0.004 * image_size * image_size))
    for shape in world.SHAPES:
        feats = []
        for frac in TEMPLATE_FRACTIONS:
            side = max(4, round(frac * image_size))
            for colour in TEMPLATE_COLOURS:
                for q in TEMPLATE_JPEG_QUALITY:
                    cands = _candidates(_template_image(shape, colour, side, image_size, q), min_area)
                    if len(cands) == 1:
                        feats.append({k: cands[0].features[k] for k in FEATURE_SCALES})
        if not feats:
            raise RuntimeError(f"detector templates: could not measure a single {shape!r} at {image_size}px")
        out[shape] = feats
    return out


def template_distances(features: dict[str, float], image_size: int = 64) -> dict[str, float]:
    """Per shape, the scaled feature distance to its nearest template."""
    return {shape: min(math.sqrt(sum(((features[k] - t[k]) / FEATURE_SCALES[k]) ** 2 for k in FEATURE_SCALES))
                       for t in temps)
            for shape, temps in shape_templates(_template_size(image_size)).items()}


def shape_fit(features: dict[str, float], image_size: int = 64) -> float:
    """Absolute fit to the world's shapes: 1 while the nearest template of any shape is within the
    spread of the world's own renders (FIT_DISTANCE[0]), falling linearly to 0 at FIT_DISTANCE[1]."""
    return 1.0 - _ramp(min(template_distances(features, image_size).values()), *FIT_DISTANCE)


def plausibility(features: dict[str, float], image_size: int = 64) -> float:
    """``fit * on_background`` (module doc, step 5): 1 for what looks like a world object, 0 for
    what cannot be one; ``features`` as the detector measures them (with ``ring_background``)."""
    return shape_fit(features, image_size) * _ramp(features["ring_background"], *RING_BACKGROUND)


def classify_shape(features: dict[str, float], image_size: int = 64) -> tuple[str, float]:
    """Nearest template in scaled feature space; confidence ``1 - d_best / d_best_other_shape``
    (relative: see :func:`plausibility` for the absolute check)."""
    d = template_distances(features, image_size)
    order = sorted(d, key=d.get)
    best, second = d[order[0]], d[order[1]] if len(order) > 1 else float("inf")
    return order[0], float(np.clip(1.0 - best / max(second, 1e-9), 0.0, 1.0))


def _template_size(image_size: int) -> int:
    # features are scale-free; size matters only through antialiasing and JPEG blur
    return 64 if image_size <= 96 else (128 if image_size <= 192 else 256)


def classify_colour(rgb: np.ndarray) -> tuple[str, float]:
    """Nearest palette colour; confidence ``1 - d_best / d_second``."""
    names, pal = _palette()
    d = np.linalg.norm(pal - np.asarray(rgb, dtype=np.float32)[None], axis=1)
    order = np.argsort(d)
    return names[int(order[0])], float(np.clip(1.0 - d[order[0]] / max(d[order[1]], 1e-9), 0.0, 1.0))


# ------------------------------------------------------------------------------------------ detect


def detect(image: Image.Image | np.ndarray, *, min_area: int | None = None,
           with_masks: bool = True) -> list[Detection]:
    """Detect the world's coloured shapes in ``image`` (PIL image or HxWx3 uint8 array).

    ``min_area`` (pixels) drops specks; default 0.4% of the image (16 px at 64x64, a third of the
    smallest world star).  Candidates that cannot be a world object (:func:`plausibility` 0) are
    dropped; the others' scores are scaled by it.  Detections are sorted left to right, then top to
    bottom.
    """
    x = _to_array(image)
    h, w, _ = x.shape
    min_area = int(min_area if min_area is not None else max(6, round(0.004 * h * w)))
    out: list[Detection] = []
    for c in _candidates(x, min_area):
        plausible = plausibility(c.features, min(h, w))
        if plausible <= 0.0:
            continue  # not one of the world's shapes on its background (noise, texture, a smear)
        colour, colour_conf = classify_colour(c.rgb)
        shape, shape_conf = classify_shape(c.features, min(h, w))
        ys, xs = np.nonzero(c.mask)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        score = math.sqrt(shape_conf * colour_conf) * plausible
        out.append(Detection(class_name=shape, color=colour, box=box, score=round(score, 4),
                             mask=c.mask if with_masks else None, features=c.features))
    out.sort(key=lambda d: ((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2))
    return out


# ----------------------------------------------------------------------------------------- caption

RELATION_MARGIN = 0.05  # beyond GenEval's 0.5 on the main axis, so box jitter cannot flip a caption


def clear_relation(box_a: Sequence[float], box_b: Sequence[float],
                   margin: float = RELATION_MARGIN) -> str | None:
    """The single relation GenEval reads for "A <rel> B", if it is read with ``margin`` to spare."""
    rels = world.geneval_relations(list(box_a), list(box_b))
    if len(rels) != 1:
        return None
    rel = next(iter(rels))
    dx, dy = world.geneval_offsets(list(box_a), list(box_b))
    main = abs(dx) if rel in ("left of", "right of") else abs(dy)
    return rel if main > 0.5 + margin else None


def caption_objects(objects: list[dict[str, Any]], relation: dict[str, Any] | None = None) -> str:
    """The world's canonical caption, also for mixed lists of 3+ objects (which caption_for's kind
    inference does not take: it calls them two_object).  Empty list -> empty string."""
    if not objects:
        return ""
    try:
        return world.caption_for(objects, relation)
    except ValueError:
        if relation is not None or len(objects) <= 2:
            raise
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in objects:
        groups.setdefault((o["class"], o.get("color")), []).append(o)
    prefix = "a photo of "
    phrases = [world.caption_for(g)[len(prefix):] for g in groups.values()]
    return prefix + ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_from_detections(dets: Sequence[Detection]) -> str:
    """GenEval-shaped caption of a detection list (empty string when nothing was found).

    1 object -> single; n >= 2 of one class and colour -> counting; 2 different objects -> the
    position caption if GenEval's rule reads exactly one relation with a margin (written as
    "left of" / "above", i.e. A is the left or upper object), else two objects.
    """
    objs = [d.as_object() for d in dets]
    if len(objs) == 2 and (objs[0]["class"], objs[0]["color"]) != (objs[1]["class"], objs[1]["color"]):
        for a, b in ((0, 1), (1, 0)):
            rel = clear_relation(objs[a]["box"], objs[b]["box"])
            if rel in ("left of", "above"):
                return world.caption_for(objs, {"relation": rel, "a": a, "b": b}, "position")
    return caption_objects(objs)


@functools.lru_cache(maxsize=1)
def _enumerated() -> tuple[str, ...]:
    shapes, colours = world.SHAPES, list(world.COLORS)
    singles = [(s, c) for s in shapes for c in colours]
    caps: list[str] = []
    for s, c in singles:
        for n in range(1, world.COUNT_RANGE[1] + 1):
            caps.append(world.caption_for([{"class": s, "color": c}] * n))
    for s1, c1 in singles:
        for s2, c2 in singles:
            if s1 == s2:
                continue
            pair = [{"class": s1, "color": c1}, {"class": s2, "color": c2}]
            caps.append(world.caption_for(pair))
            for rel in ("left of", "above"):
                caps.append(world.caption_for(pair, {"relation": rel, "a": 0, "b": 1}))
    return tuple(caps)


def enumerate_world_captions() -> list[str]:
    """Every caption caption_from_detections gives for the world's scene kinds (single, counting up
    to COUNT_RANGE, two different shapes with or without a left-of/above relation): candidates for
    CLIP retrieval."""
    return list(_enumerated())
