"""A deterministic world of captioned images whose structure is known exactly (GenEval-shaped).

Every scene is a function of ``(cfg.seed, index)`` alone, so any index range is a reproducible
split and the ground truth (classes, colours, boxes, relation, caption) of every image is known.
The vocabulary follows GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment"): its ten colour names, its four task kinds we can draw
(single object, two objects, counting, position) and its rule for judging relative position.
Shapes stand in for COCO classes; they are chosen so a simple pixel detector can tell them apart
(fill ratio of the bounding box: square 1.0, circle ~0.79, cross ~0.59, triangle 0.5, star ~0.33;
the triangle is also the only bottom-heavy one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# GenEval's ten colour names; RGB values chosen far apart from each other and from the neutral
# grays used for backgrounds (every colour is either saturated or very dark/very light).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "purple": (135, 40, 185),
    "pink": (255, 130, 195),
    "brown": (115, 65, 20),
    "black": (12, 12, 12),
    "white": (248, 248, 248),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single_object", "two_object", "counting", "position")

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
COUNT_WORDS: dict[int, str] = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five",
    6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
}
COUNT_RANGE = (2, 4)  # objects in a counting scene (GenEval counts two to four)

# GenEval's relative-position rule (evaluation/evaluate_images.py, POSITION_THRESHOLD = 0.1):
# the centre offset is shrunk by 0.1 * (sum of both box sizes) per axis, divided by the norm of
# the raw offset, and a component beyond +-0.5 names the relation.
GENEVAL_POSITION_THRESHOLD = 0.1
# Our scenes pass the rule with room to spare, so a detector whose boxes are off by a pixel
# still reads the intended relation and only that one.
POSITION_MARGIN = 0.1

SUPERSAMPLE = 4
BACKGROUND_GRAY = (95, 165)  # neutral gray range: far from black (12) and white (248)
BACKGROUND_TINT = 3  # at most +-3 per channel, so the gray never reads as a colour
TEXTURE_AMPLITUDE = (4.0, 10.0)


def _known_subset(v: tuple[str, ...], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    bad = [x for x in v if x not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad}; choose from {list(allowed)}")
    if len(set(v)) != len(v):
        raise ValueError(f"{what} has duplicates: {list(v)}")
    return v


class WorldConfig(BaseModel):
    """What the world draws. Frozen: a config names a world, and its hash names its data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, ge=0, description="world seed; scene i depends only on (seed, i)")
    image_size: int = Field(64, ge=16, le=512, description="side of the square images in pixels")
    shapes: tuple[str, ...] = Field(SHAPES, min_length=1, description="shape classes to use (subset of SHAPES)")
    colors: tuple[str, ...] = Field(
        tuple(COLORS), min_length=1, description="colour names to use (subset of COLORS)"
    )
    kind_weights: dict[str, float] = Field(
        default_factory=lambda: {k: 1.0 for k in KINDS},
        description="relative frequency of each scene kind (keys from KINDS; missing = 0)",
    )
    textured_background_rate: float = Field(
        0.5, ge=0.0, le=1.0, description="fraction of scenes with a lightly textured gray background"
    )
    min_object_frac: float = Field(0.2, ge=0.05, le=0.45, description="smallest object side / image side")
    max_object_frac: float = Field(0.38, ge=0.05, le=0.45, description="largest object side / image side")
    aspect_ratios: tuple[float, ...] = Field(
        (), description="width/height ratios of non-square scenes, one drawn per scene from (seed, index); a "
        "canvas holds about image_size^2 pixels (see canvas_size) and objects keep the square world's sizes. "
        "Empty: every scene is image_size x image_size"
    )

    @field_validator("aspect_ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [r for r in v if not (math.isfinite(r) and 0.25 <= r <= 4.0)]
        if bad:
            raise ValueError(f"aspect_ratios must each lie in [0.25, 4] (width / height), got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"aspect_ratios has duplicates: {list(v)}")
        return v

    @field_validator("shapes")
    @classmethod
    def _known_shapes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _known_subset(v, SHAPES, "shapes")

    @field_validator("colors")
    @classmethod
    def _known_colors(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _known_subset(v, tuple(COLORS), "colors")

    @field_validator("kind_weights")
    @classmethod
    def _known_kinds(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kinds {bad} in kind_weights; choose from {list(KINDS)}")
        neg = {k: w for k, w in v.items() if not (w >= 0 and math.isfinite(w))}
        if neg:
            raise ValueError(f"kind_weights must be finite and >= 0, got {neg}")
        if sum(v.values()) <= 0:
            raise ValueError("kind_weights sum to 0; give at least one kind a positive weight")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> WorldConfig:
        if self.min_object_frac > self.max_object_frac:
            raise ValueError(
                f"min_object_frac ({self.min_object_frac}) is larger than max_object_frac ({self.max_object_frac})"
            )
        if self.min_object_frac * self.image_size < 3:
            raise ValueError(
                f"objects would be under 3 px: min_object_frac {self.min_object_frac} x image_size "
                f"{self.image_size}; raise min_object_frac or image_size"
            )
        if self.aspect_ratios:
            short = min(min(canvas_for_ratio(self.image_size, r)) for r in self.aspect_ratios)
            if short < 2 * round(self.min_object_frac * self.image_size) + self.gap:
                raise ValueError(
                    f"aspect_ratios {list(self.aspect_ratios)}: the narrowest canvas side ({short} px) cannot stack "
                    f"two objects of min_object_frac x image_size (one above the other); use ratios nearer 1 or a "
                    f"lower min_object_frac"
                )
        needs_two = [k for k in ("two_object", "position") if self.kind_weights.get(k, 0) > 0]
        if needs_two and len(self.shapes) < 2:
            raise ValueError(f"kinds {needs_two} need two different shapes but shapes is {list(self.shapes)}")
        return self

    def __hash__(self) -> int:  # dict field makes the default frozen hash fail
        from imagegen.hashing import stable_hash

        return int(stable_hash(self, 15), 16)

    @property
    def gap(self) -> int:
        """Minimum free pixels between objects: 2 px at 64x64, scaled with the image."""
        return max(2, round(2 * self.image_size / 64))


def canvas_for_ratio(image_size: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about image_size^2 pixels with width / height ~= ratio (1: the square)."""
    return max(8, round(image_size * math.sqrt(ratio))), max(8, round(image_size / math.sqrt(ratio)))


def canvas_size(cfg: WorldConfig, index: int) -> tuple[int, int]:
    """(width, height) of scene ``index``: the square, or a ratio of ``cfg.aspect_ratios`` drawn
    from its own stream of (seed, index), so the square world's scenes are unchanged by the option."""
    if not cfg.aspect_ratios:
        return cfg.image_size, cfg.image_size
    rng = np.random.default_rng([cfg.seed, index, 0xA5])
    return canvas_for_ratio(cfg.image_size, cfg.aspect_ratios[int(rng.integers(len(cfg.aspect_ratios)))])


@dataclass
class Scene:
    """Ground truth of one image. Boxes are ``[x0, y0, x1, y1]`` pixels, x1/y1 exclusive;
    ``width``/``height`` are set for a non-square canvas (None: image_size x image_size)."""

    index: int
    kind: str
    objects: list[dict[str, Any]]
    relation: dict[str, Any] | None
    background: dict[str, Any]
    caption: str
    image_size: int = 64  # the size the boxes refer to; render() refuses a config of another size
    width: int | None = None
    height: int | None = None

    @property
    def canvas(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return (self.width or self.image_size, self.height or self.image_size)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.width is None and self.height is None:  # a square scene's record is as before the option
            del out["width"], out["height"]
        return out


# ----------------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(cls_name: str, color: str | None, count: int) -> str:
    adj = f"{color} " if color else ""
    if count == 1:
        return f"{_article(adj or cls_name)} {adj}{cls_name}"
    word = COUNT_WORDS.get(count, str(count))
    return f"{word} {adj}{PLURALS.get(cls_name, cls_name + 's')}"


def infer_kind(objects: list[dict[str, Any]], relation: dict[str, Any] | None = None) -> str:
    """The GenEval kind an object list reads as (used when a detector, not the world, made it)."""
    if relation is not None:
        return "position"
    if len(objects) == 1:
        return "single_object"
    if len({(o["class"], o.get("color")) for o in objects}) == 1:
        return "counting"
    return "two_object"


def caption_for(
    objects: list[dict[str, Any]], relation: dict[str, Any] | None = None, kind: str | None = None
) -> str:
    """The canonical GenEval-style caption of an object list (pure: same input, same words).

    ``"a photo of a red circle"``, ``"a photo of a red circle and a blue square"``,
    ``"a photo of three green stars"``, ``"a photo of a red circle left of a blue square"``.
    Lists the world never makes (e.g. three different objects from a detector) are still
    described: identical (class, colour) objects are counted, groups joined with commas/"and".
    """
    if not objects:
        raise ValueError("caption_for needs at least one object, got an empty list")
    for i, o in enumerate(objects):
        if "class" not in o:
            raise ValueError(f"object {i} has no 'class': {o}")
    strict = kind is not None  # an explicit kind must match the objects; an inferred one always does
    kind = kind or infer_kind(objects, relation)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {list(KINDS)}")
    if kind == "position":
        if relation is None:
            raise ValueError("kind 'position' needs a relation {'relation', 'a', 'b'}")
        rel = relation.get("relation")
        if rel not in RELATIONS:
            raise ValueError(f"unknown relation {rel!r}; choose from {list(RELATIONS)}")
        a, b = relation.get("a"), relation.get("b")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < len(objects) and 0 <= b < len(objects) and a != b):
            raise ValueError(f"relation indices a={a!r}, b={b!r} do not name two objects of {len(objects)}")
        oa, ob = objects[a], objects[b]
        return (
            f"a photo of {_noun_phrase(oa['class'], oa.get('color'), 1)} {rel} "
            f"{_noun_phrase(ob['class'], ob.get('color'), 1)}"
        )
    if relation is not None:
        raise ValueError(f"kind {kind!r} takes no relation, got {relation}")
    if strict and kind == "single_object" and len(objects) != 1:
        raise ValueError(f"kind 'single_object' needs exactly 1 object, got {len(objects)}")
    groups: dict[tuple[str, str | None], int] = {}
    for o in objects:
        key = (o["class"], o.get("color"))
        groups[key] = groups.get(key, 0) + 1
    if strict and kind == "counting" and len(groups) != 1:
        raise ValueError(f"kind 'counting' needs objects of one class and colour, got {sorted(map(str, groups))}")
    if strict and kind == "two_object" and len(objects) != 2:
        raise ValueError(f"kind 'two_object' needs exactly 2 objects, got {len(objects)}")
    phrases = [_noun_phrase(c, col, n) for (c, col), n in groups.items()]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"a photo of {body}"


# --------------------------------------------------------------------------- GenEval position


def geneval_offsets(box_a: list[float], box_b: list[float],
                    threshold: float = GENEVAL_POSITION_THRESHOLD) -> tuple[float, float]:
    """GenEval's normalised, shrunk centre offset (dx, dy) of box A relative to box B.

    Returns (0, 0) when the shrunk offset vanishes (GenEval then reports no relation).
    """
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a[:4])
    bx0, by0, bx1, by1 = (float(v) for v in box_b[:4])
    ox = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    oy = (ay0 + ay1) / 2 - (by0 + by1) / 2
    t = threshold
    rx = math.copysign(max(abs(ox) - t * (abs(ax1 - ax0) + abs(bx1 - bx0)), 0.0), ox)
    ry = math.copysign(max(abs(oy) - t * (abs(ay1 - ay0) + abs(by1 - by0)), 0.0), oy)
    if abs(rx) < 1e-3 and abs(ry) < 1e-3:
        return 0.0, 0.0
    norm = math.hypot(ox, oy)
    return rx / norm, ry / norm


def geneval_relations(box_a: list[float], box_b: list[float],
                      threshold: float = GENEVAL_POSITION_THRESHOLD) -> set[str]:
    """The set of relations GenEval reads for "A <relation> B" (image y grows downward)."""
    dx, dy = geneval_offsets(box_a, box_b, threshold)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _relation_clear(box_a: list[int], box_b: list[int], relation: str, margin: float = POSITION_MARGIN) -> bool:
    """True when A is ``relation`` B beyond 0.5+margin and the other axis stays under 0.5-margin."""
    dx, dy = geneval_offsets(box_a, box_b)
    main, other, sign = {
        "left of": (dx, dy, -1),
        "right of": (dx, dy, 1),
        "above": (dy, dx, -1),
        "below": (dy, dx, 1),
    }[relation]
    return sign * main > 0.5 + margin and abs(other) < 0.5 - margin


# ------------------------------------------------------------------------------------ layout


def _boxes_clear(box: list[int], placed: list[list[int]], gap: int) -> bool:
    for p in placed:
        if box[0] < p[2] + gap and p[0] < box[2] + gap and box[1] < p[3] + gap and p[1] < box[3] + gap:
            return False
    return True


def place_boxes(
    rng: np.random.Generator, cfg: WorldConfig, n: int, relation: str | None,
    canvas: tuple[int, int] | None = None,
) -> list[list[int]]:
    """Sample ``n`` non-overlapping square boxes (with the gap), shrinking sizes when crowded.
    Object sides scale with image_size; ``canvas`` = (width, height), default the square."""
    size = cfg.image_size
    cw, ch = canvas if canvas is not None else (size, size)
    lo = max(3, round(cfg.min_object_frac * size))
    hi = max(lo, round(cfg.max_object_frac * size))
    gap = cfg.gap
    for attempt in range(60):
        # Every 6 failed layouts, pull the upper size bound towards the lower one.
        shrink = min(1.0, (attempt // 6) / 6)
        top = round(hi - (hi - lo) * shrink)
        sides = [int(rng.integers(lo, top + 1)) for _ in range(n)]
        boxes: list[list[int]] = []
        for s in sides:
            for _ in range(40):
                x0 = int(rng.integers(0, cw - s + 1))
                y0 = int(rng.integers(0, ch - s + 1))
                box = [x0, y0, x0 + s, y0 + s]
                if not _boxes_clear(box, boxes, gap):
                    continue
                if relation is not None and boxes and not _relation_clear(boxes[0], box, relation):
                    continue
                boxes.append(box)
                break
            else:
                break
        if len(boxes) == n:
            return boxes
    raise RuntimeError(
        f"could not place {n} objects ({lo}-{hi} px, gap {gap}) in {cw}x{ch}"
        f"{' for ' + relation if relation else ''}; lower max_object_frac"
    )


def _pick(rng: np.random.Generator, options: tuple[str, ...], k: int = 1, distinct: bool = False) -> list[str]:
    if distinct:
        idx = rng.choice(len(options), size=k, replace=False)
        return [options[int(i)] for i in idx]
    return [options[int(rng.integers(len(options)))] for _ in range(k)]


def _kind_probs(cfg: WorldConfig) -> np.ndarray:
    w = np.array([cfg.kind_weights.get(k, 0.0) for k in KINDS], dtype=float)
    return w / w.sum()


def make_scene(cfg: WorldConfig, index: int) -> Scene:
    """Scene ``index`` of the world ``cfg``: depends on ``(cfg.seed, index)`` and the config only."""
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    rng = np.random.default_rng([cfg.seed, index])
    canvas = canvas_size(cfg, index)
    kind = KINDS[int(rng.choice(len(KINDS), p=_kind_probs(cfg)))]
    relation: dict[str, Any] | None = None
    if kind == "single_object":
        classes, colors = _pick(rng, cfg.shapes), _pick(rng, cfg.colors)
        boxes = place_boxes(rng, cfg, 1, None, canvas)
    elif kind == "two_object":
        classes, colors = _pick(rng, cfg.shapes, 2, distinct=True), _pick(rng, cfg.colors, 2)
        boxes = place_boxes(rng, cfg, 2, None, canvas)
    elif kind == "counting":
        n = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
        classes, colors = _pick(rng, cfg.shapes) * n, _pick(rng, cfg.colors) * n
        boxes = place_boxes(rng, cfg, n, None, canvas)
    else:  # position: objects[0] <relation> objects[1]
        classes, colors = _pick(rng, cfg.shapes, 2, distinct=True), _pick(rng, cfg.colors, 2)
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        boxes = place_boxes(rng, cfg, 2, rel, canvas)
        relation = {"relation": rel, "a": 0, "b": 1}
    objects = [{"class": c, "color": col, "box": b} for c, col, b in zip(classes, colors, boxes)]
    background = make_background(rng, cfg)
    return Scene(
        index=index,
        kind=kind,
        objects=objects,
        relation=relation,
        background=background,
        caption=caption_for(objects, relation, kind),
        image_size=cfg.image_size,
        **({} if not cfg.aspect_ratios else {"width": canvas[0], "height": canvas[1]}),
    )


# ---------------------------------------------------------------------------------- rendering


def make_background(rng: np.random.Generator, cfg: WorldConfig) -> dict[str, Any]:
    gray = int(rng.integers(BACKGROUND_GRAY[0], BACKGROUND_GRAY[1] + 1))
    tint = [int(t) for t in rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)]
    textured = bool(rng.random() < cfg.textured_background_rate)
    bg: dict[str, Any] = {"type": "textured" if textured else "plain", "gray": gray, "tint": tint}
    if textured:
        bg["texture"] = "gradient" if rng.random() < 0.5 else "noise"
        bg["amplitude"] = round(float(rng.uniform(*TEXTURE_AMPLITUDE)), 3)
        bg["texture_seed"] = int(rng.integers(2**31))
    return bg


def background_array(bg: dict[str, Any], size: int, height: int | None = None) -> np.ndarray:
    """Float HxWx3 background (width ``size``, height ``height``, default square); textures stay
    within +-amplitude of the gray."""
    w, h = size, size if height is None else height
    base = np.array([bg["gray"] + t for t in bg["tint"]], dtype=np.float32)
    if bg["type"] == "plain":
        return np.full((h, w, 3), base, dtype=np.float32)
    amp = float(bg["amplitude"])
    trng = np.random.default_rng(bg["texture_seed"])
    if bg["texture"] == "gradient":
        theta = trng.uniform(0, 2 * np.pi)
        tx = np.linspace(-1.0, 1.0, w, dtype=np.float32)
        ty = np.linspace(-1.0, 1.0, h, dtype=np.float32)
        field_ = np.cos(theta) * tx[None, :] + np.sin(theta) * ty[:, None]
        field_ /= max(float(np.abs(field_).max()), 1e-6)
    else:  # smooth blotches: coarse noise upsampled bilinearly, plus a little grain
        coarse = trng.uniform(-1, 1, size=(6, 6)).astype(np.float32)
        img = Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR)
        field_ = np.asarray(img, dtype=np.float32) * 0.8
        field_ += trng.uniform(-0.2, 0.2, size=(h, w)).astype(np.float32)
    return base + (amp * np.clip(field_, -1, 1))[..., None]


def _star_points(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """Five-pointed star (inner/outer radius 0.38), point up, stretched to fill the box exactly."""
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.38
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, Mx, my, My = min(xs), max(xs), min(ys), max(ys)
    return [(x0 + (px - mx) / (Mx - mx) * (x1 - x0), y0 + (py - my) / (My - my) * (y1 - y0)) for px, py in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, w: int, h: int) -> None:
    """Draw ``shape`` filling a ``w`` x ``h`` supersampled canvas (coverage 255)."""
    x0, y0, x1, y1 = 0, 0, w - 1, h - 1
    fill = 255
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(x0, y0, x1, y1), fill=fill)
    elif shape == "cross":
        arm = 0.36
        draw.rectangle([x0 + x1 * (1 - arm) / 2, y0, x0 + x1 * (1 + arm) / 2, y1], fill=fill)
        draw.rectangle([x0, y0 + y1 * (1 - arm) / 2, x1, y0 + y1 * (1 + arm) / 2], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")


def coverage(shape: str, w: int, h: int) -> np.ndarray:
    """Antialiased coverage (0..1, float32, h x w) of ``shape`` filling a w x h pixel box.

    Drawn at 4x and box-filtered down, so edge pixels carry the fraction of them covered.
    """
    s = SUPERSAMPLE
    mask = Image.new("L", (w * s, h * s))
    _draw_shape(ImageDraw.Draw(mask), shape, w * s, h * s)
    return np.asarray(mask.reduce(s), dtype=np.float32) / 255.0


def render(scene: Scene, cfg: WorldConfig) -> Image.Image:
    """RGB image of ``scene``: each object's coverage blended over the background.

    Objects never overlap, so each box is composited independently: out = bg*(1-a) + colour*a.
    """
    size = cfg.image_size
    if scene.image_size != size:
        raise ValueError(f"scene {scene.index} was made for {scene.image_size}px, cfg says {size}px")
    cw, ch = scene.canvas
    out = background_array(scene.background, cw, ch).copy()
    for o in scene.objects:
        if o["color"] not in COLORS:
            raise ValueError(f"scene {scene.index}: unknown colour {o['color']!r}")
        x0, y0, x1, y1 = o["box"]
        if not (0 <= x0 < x1 <= cw and 0 <= y0 < y1 <= ch):
            raise ValueError(f"scene {scene.index}: box {o['box']} is not inside the {cw}x{ch} image")
        a = coverage(o["class"], x1 - x0, y1 - y0)[..., None]
        region = out[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = region * (1.0 - a) + np.asarray(COLORS[o["color"]], dtype=np.float32) * a
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


def render_scene(cfg: WorldConfig, index: int) -> tuple[Scene, Image.Image]:
    scene = make_scene(cfg, index)
    return scene, render(scene, cfg)


# ------------------------------------------------------------------- planted content (filters)
# Drawn content that real content filters must catch; planted only when a publish config asks.

# Skin tones (light to dark) for the figure an NSFW detector must flag.
# NudeNet scores the same drawing lower on darker skin (mean 0.49 on (172, 112, 80) against 0.69-0.75
# on these three, 400 draws at 64 px): a bias of the detector worth knowing when setting its
# threshold.  The planted figures use the three tones it flags reliably, so every planted row is
# one the detector must catch.
FIGURE_SKIN: tuple[tuple[int, int, int], ...] = ((241, 194, 165), (224, 172, 140), (198, 134, 103))
FIGURE_AREOLA: tuple[int, int, int] = (150, 80, 70)
# Short common words for rendered-text rows (the kind of overlay text web images carry).
OVERLAY_WORDS: tuple[str, ...] = (
    "SALE", "STOCK", "HELLO", "FREE", "PHOTO", "OPEN", "NEWS", "SHOP", "PARIS", "LOGO", "DEMO", "HOTEL",
    "MUSIC", "CAFE", "BOOK", "GAME", "CITY", "LOVE", "HOME", "MENU", "TAXI", "BANK", "PARK", "CLUB",
    "Shop", "Sale", "Hello", "Paris", "music", "promo", "sample", "online",
)


def render_figure(rng: np.random.Generator, size: int) -> Image.Image:
    """A crude drawing of a bare chest: two shaded skin-tone discs with darker areolae, on skin.

    Nothing but filled circles, yet NudeNet's detector reads it as FEMALE_BREAST_EXPOSED (0.6-0.9 at
    64 px, measured), which is what a planted NSFW row needs: content a real detector flags.  The
    position, size and a gray band above or below vary so that figures differ in phash as much
    as scenes do.
    """
    s = SUPERSAMPLE * 4
    w = size * s
    skin = FIGURE_SKIN[int(rng.integers(len(FIGURE_SKIN)))]
    r_frac = float(rng.uniform(0.15, 0.2))
    sep = float(rng.uniform(1.05, 1.2)) * r_frac
    a_frac = float(rng.uniform(0.18, 0.22))
    cx0 = w // 2 + int(rng.uniform(-0.12, 0.12) * w)
    cy = w // 2 + int(rng.uniform(-0.15, 0.15) * w)
    img = Image.new("RGB", (w, w), tuple(int(v * 0.97) for v in skin))
    draw = ImageDraw.Draw(img)
    r = int(r_frac * w)
    band = float(rng.uniform(0.0, 0.3))  # a gray band (background beyond the body) above or below
    gray = int(rng.integers(BACKGROUND_GRAY[0], BACKGROUND_GRAY[1] + 1))
    if rng.random() < 0.5:
        draw.rectangle((0, 0, w, int(band * w)), fill=(gray, gray, gray))
    else:
        draw.rectangle((0, w - int(band * w), w, w), fill=(gray, gray, gray))
    for cx in (cx0 - int(sep * w), cx0 + int(sep * w)):
        for k in range(r, 0, -s):  # shading: 12 % darker towards the centre
            t = k / r
            draw.ellipse((cx - k, cy - k, cx + k, cy + k), fill=tuple(int(v * (1.0 - 0.12 * (1 - t))) for v in skin))
        a = int(a_frac * r)
        draw.ellipse((cx - a, cy + r // 4 - a, cx + a, cy + r // 4 + a), fill=FIGURE_AREOLA)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def overlay_word(img: Image.Image, scene: Scene, word: str) -> tuple[Image.Image, dict[str, Any]] | None:
    """``img`` with ``word`` drawn in dark letters across a band free of the scene's objects.

    Font: Pillow's bundled scalable font (``ImageFont.load_default(size)``, no system fonts), about a
    quarter of the image side (16 px at 64 px), shrunk until the word fits the width.  Returns None
    when neither the top nor the bottom band is free of objects.
    """
    from PIL import ImageFont

    size, height = img.size
    px = max(8, round(min(size, height) / 4))
    draw = ImageDraw.Draw(img)
    while True:
        font = ImageFont.load_default(size=px)
        bb = draw.textbbox((0, 0), word, font=font)
        if bb[2] - bb[0] <= size - 4 or px <= 6:
            break
        px -= 1
    x = (size - (bb[2] - bb[0])) // 2 - bb[0]
    margin = max(1, size // 32)
    for y in (height - bb[3] - 2 * margin, 2 * margin - bb[1]):
        box = [x + bb[0] - margin, y + bb[1] - margin, x + bb[2] + margin, y + bb[3] + margin]
        if all(o["box"][3] <= box[1] or o["box"][1] >= box[3] for o in scene.objects):
            out = img.copy()
            ImageDraw.Draw(out).text((x, y), word, font=font, fill=(12, 12, 12))
            return out, {"word": word, "font_px": px, "text_box": [int(v) for v in box]}
    return None
