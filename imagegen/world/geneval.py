"""GenEval on the embedded world: its prompt file (``world_prompts``), its pixel detector as a
GenEval detector (``WorldDetector``) and the oracle renderer drawing what a perfect model would
(``render_world_prompt``, ``world_prompt_images``).  The benchmark itself (prompt format, rules,
layout, scoring) is :mod:`imagegen.evaluate.geneval`."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image

from imagegen.evaluate.geneval import RELATIONS, Det, MakeImages, parse_prompt


def world_prompts(world_cfg: Any, n_per_task: int = 100, seed: int = 43) -> list[dict[str, Any]]:
    """GenEval metadata over the embedded world's vocabulary, all six tasks.

    Built as GenEval's ``prompts/create_prompts.py`` builds its suite (default seed 43): every
    shape once for ``single_object``; ``n_per_task`` random draws for each other task (distinct
    classes for two objects, counts 2-4 with the exclude clause at count + 1, one colour, one of
    four relations with the related object as clause 0, two distinct classes with two distinct
    colours); exact duplicates dropped.  Shapes and colours come from ``world_cfg``; prompts are
    the world's captions (``scene.caption_for``) of the requested objects.  Deterministic in
    ``(world_cfg.shapes, world_cfg.colors, n_per_task, seed)``.
    """
    from imagegen.world.scene import COUNT_RANGE, caption_for

    shapes, colors = list(world_cfg.shapes), list(world_cfg.colors)
    if len(shapes) < 2:
        raise ValueError(f"GenEval's two_object, position and color_attr tasks need two shapes; "
                         f"the world has {shapes}")
    if len(colors) < 2:
        raise ValueError(f"GenEval's color_attr task needs two colours; the world has {colors}")
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []

    def obj(cls: str, color: str | None = None) -> dict[str, Any]:
        return {"class": cls, "color": color} if color else {"class": cls}

    for i in rng.choice(len(shapes), size=len(shapes), replace=False):
        s = shapes[int(i)]
        out.append({"tag": "single_object", "include": [{"class": s, "count": 1}],
                    "prompt": caption_for([obj(s)])})
    for _ in range(n_per_task):
        a, b = (shapes[int(i)] for i in rng.choice(len(shapes), size=2, replace=False))
        out.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                    "prompt": caption_for([obj(a), obj(b)], kind="two_object")})
    for _ in range(n_per_task):
        s = shapes[int(rng.integers(len(shapes)))]
        k = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1], endpoint=True))
        out.append({"tag": "counting", "include": [{"class": s, "count": k}],
                    "exclude": [{"class": s, "count": k + 1}],
                    "prompt": caption_for([obj(s)] * k, kind="counting")})
    for _ in range(n_per_task):
        s = shapes[int(rng.integers(len(shapes)))]
        c = colors[int(rng.integers(len(colors)))]
        out.append({"tag": "colors", "include": [{"class": s, "count": 1, "color": c}],
                    "prompt": caption_for([obj(s, c)])})
    for _ in range(n_per_task):
        a, b = (shapes[int(i)] for i in rng.choice(len(shapes), size=2, replace=False))
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        out.append({"tag": "position",
                    "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                    "prompt": caption_for([obj(a), obj(b)], {"relation": rel, "a": 0, "b": 1}, "position")})
    for _ in range(n_per_task):
        a, b = (shapes[int(i)] for i in rng.choice(len(shapes), size=2, replace=False))
        ca, cb = (colors[int(i)] for i in rng.choice(len(colors), size=2, replace=False))
        out.append({"tag": "color_attr",
                    "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                    "prompt": caption_for([obj(a, ca), obj(b, cb)], kind="two_object")})
    seen: set[str] = set()
    unique = []
    for m in out:
        key = json.dumps(m, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(parse_prompt(m).to_metadata())
    return unique


class WorldDetector:
    """The embedded world's pixel-only detector as a GenEval detector (class, score, box, mask,
    colour); pair it with :func:`detector_color` or :func:`clip_color_classifier`."""

    name = "world-pixel-detector"

    def __init__(self, min_area: int | None = None) -> None:
        self.min_area = min_area

    def __call__(self, image: Image.Image) -> list[Det]:
        from imagegen.world.detector import detect

        return [Det(class_name=d.class_name, score=float(d.score), box=[float(v) for v in d.box],
                    mask=d.mask, color=d.color)
                for d in detect(image, min_area=self.min_area)]


def render_world_prompt(world_cfg: Any, metadata: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """An embedded-world image that satisfies ``metadata`` (what a perfect model would draw).

    Objects of each include clause are drawn ``count`` times in its colour (a random world
    colour when the clause has none); a position clause (the two-clause form GenEval uses) is
    placed with the world's own margin.  Exclude clauses are met because nothing else is drawn.
    """
    from imagegen.world import scene as W

    p = parse_prompt(metadata)
    colors = list(world_cfg.colors)
    objects: list[dict[str, Any]] = []
    for req in p.include:
        if req.class_ not in W.SHAPES:
            raise ValueError(f"the world cannot draw class {req.class_!r}; its shapes are {list(W.SHAPES)}")
        for _ in range(req.count):
            color = req.color or colors[int(rng.integers(len(colors)))]
            objects.append({"class": req.class_, "color": color})
    relation = None
    positioned = [i for i, r in enumerate(p.include) if r.position is not None]
    if positioned:
        if len(p.include) != 2 or positioned != [1] or any(r.count != 1 for r in p.include):
            raise ValueError("render_world_prompt draws positions only in GenEval's form: two clauses "
                             "of count 1, the second positioned relative to the first")
        rel = p.include[1].position[0]  # type: ignore[index]
        objects = [objects[1], objects[0]]  # A (clause 1) first: the world places A <rel> B
        relation = {"relation": rel, "a": 0, "b": 1}
    # scene's layout and background helpers: the same placement rules as the world's own scenes
    boxes = W.place_boxes(rng, world_cfg, len(objects), relation["relation"] if relation else None)
    for o, b in zip(objects, boxes):
        o["box"] = b
    scene = W.Scene(index=0, kind=W.infer_kind(objects, relation), objects=objects, relation=relation,
                    background=W.make_background(rng, world_cfg), caption=p.prompt,
                    image_size=world_cfg.image_size)
    return W.render(scene, world_cfg)


def world_prompt_images(world_cfg: Any, seed: int = 0) -> MakeImages:
    """``make_images`` for :func:`generate_layout` drawing the world's own images per prompt
    (image k of prompt i from ``(world seed, seed, i, k)``)."""

    def make(metadata: dict[str, Any], n: int, index: int) -> list[Image.Image]:
        return [render_world_prompt(world_cfg, metadata, np.random.default_rng([world_cfg.seed, seed, index, k]))
                for k in range(n)]

    return make
