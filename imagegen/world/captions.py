"""Scoring captions against the embedded world's ground truth: ``parse_world_caption`` reads the
world's canonical captions back into objects and a relation; ``caption_accuracy`` compares
captions with the scenes' true objects (the dataset card's world report)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any


_SWAP = {"right of": "left of", "below": "above"}


def _world_grammar() -> tuple[re.Pattern[str], re.Pattern[str], dict[str, int], dict[str, str]]:
    """Regexes for the world's canonical captions, built from its vocabulary."""
    from imagegen.world import scene as world

    numbers = {w: n for n, w in world.COUNT_WORDS.items()} | {"a": 1, "an": 1}
    nouns = {s: s for s in world.SHAPES} | {p: s for s, p in world.PLURALS.items()}
    alt = lambda words: "|".join(sorted(map(re.escape, words), key=len, reverse=True))  # noqa: E731
    np_ = rf"(?:(?P<num>{alt(numbers)}|\d+) )(?:(?P<col>{alt(world.COLORS)}) )?(?P<noun>{alt(nouns)})"
    rel = rf"(?P<rel>{alt(world.RELATIONS)})"
    position = re.compile(rf"a photo of (?P<a>.+?) {rel} (?P<b>.+)")
    return position, re.compile(np_), numbers, nouns


def parse_world_caption(caption: str) -> dict[str, Any] | None:
    """Parse a world caption back into objects and relation; None if it is not world phrasing.

    Returns ``{"objects": [(class, color|None), ...], "relation": (rel, i, j) | None}`` where
    ``objects[i] <rel> objects[j]``.  Accepts "a photo of a red circle", "... three green stars",
    "... a red circle, two blue squares and a star", "... a red circle left of a blue square".
    """
    position, np_re, numbers, nouns = _world_grammar()
    text = " ".join(str(caption).lower().strip().rstrip(".").split())

    def phrase(p: str) -> list[tuple[str, str | None]] | None:
        m = np_re.fullmatch(p)
        if not m:
            return None
        n = numbers.get(m["num"]) or int(m["num"])
        singular = nouns[m["noun"]] == m["noun"]
        if (n == 1) != singular or n < 1:
            return None  # "two circle" / "a circles"
        return [(nouns[m["noun"]], m["col"])] * n

    m = position.fullmatch(text)
    if m:
        a, b = phrase(m["a"]), phrase(m["b"])
        if a is None or b is None or len(a) != 1 or len(b) != 1:
            return None
        return {"objects": a + b, "relation": (m["rel"], 0, 1)}
    if not text.startswith("a photo of "):
        return None
    body = text[len("a photo of "):]
    parts = re.split(r", | and ", body)
    objects: list[tuple[str, str | None]] = []
    for p in parts:
        got = phrase(p)
        if got is None:
            return None
        objects += got
    return {"objects": objects, "relation": None}


def _normal_relation(objs: list[tuple[str, str | None]], rel: tuple[str, int, int] | None) -> tuple | None:
    """(A, rel, B) with right of / below rewritten as left of / above by swapping A and B."""
    if rel is None:
        return None
    name, i, j = rel
    if name in _SWAP:
        name, i, j = _SWAP[name], j, i
    return (objs[i], name, objs[j])


def caption_accuracy(captions: list[str], truth_objects: list[list[dict]],
                     truth_relations: list[dict | None] | None = None,
                     truth_captions: list[str] | None = None) -> dict[str, Any]:
    """How well captions describe world scenes, judged on content rather than wording.

    * ``object_match``: same multiset of (class, colour) (a caption without colours matches on
      class only for those objects);
    * ``class_match`` / ``count_match``: same multiset of classes / same number of objects;
    * ``relation_match`` (with ``truth_relations``): object_match, and for position scenes the
      same relation up to the symmetric rewriting (A left of B == B right of A).  A relation in
      a caption of a scene without one is not an error: it may simply be true;
    * ``exact_match`` (with ``truth_captions``): identical strings (unfair: "A left of B" and
      "B right of A" differ, and a two-object scene may also satisfy a relation);
    * ``parsed``: captions in the world's phrasing.  Unparseable captions count as wrong.
    """
    if len(captions) != len(truth_objects):
        raise ValueError(f"caption_accuracy: {len(captions)} captions but {len(truth_objects)} truth object lists")
    for name, other in (("truth_relations", truth_relations), ("truth_captions", truth_captions)):
        if other is not None and len(other) != len(captions):
            raise ValueError(f"caption_accuracy: {name} has {len(other)} items, captions {len(captions)}")
    n = len(captions)
    tally: Counter[str] = Counter()
    for i, (cap, truth) in enumerate(zip(captions, truth_objects)):
        try:
            t_objs = [(o["class"], o["color"]) for o in truth]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"caption_accuracy: truth_objects[{i}] needs dicts with class and color: "
                             f"{truth!r}") from exc
        parsed = parse_world_caption(cap) if isinstance(cap, str) else None
        if truth_captions is not None:
            tally["exact_match"] += cap == truth_captions[i]
        if parsed is None:
            continue
        p_objs = parsed["objects"]
        tally["parsed"] += 1
        tally["count_match"] += len(p_objs) == len(t_objs)
        tally["class_match"] += Counter(c for c, _ in p_objs) == Counter(c for c, _ in t_objs)
        obj_ok = _objects_match(p_objs, t_objs)
        tally["object_match"] += obj_ok
        if truth_relations is not None:
            t_rel = truth_relations[i]
            if t_rel is None:
                tally["relation_match"] += obj_ok
            else:
                want = _normal_relation(t_objs, (t_rel["relation"], t_rel["a"], t_rel["b"]))
                got = _normal_relation(p_objs, parsed["relation"])
                tally["relation_match"] += obj_ok and got is not None and _rel_equal(got, want)
    keys = ["parsed", "count_match", "class_match", "object_match"]
    keys += ["relation_match"] if truth_relations is not None else []
    keys += ["exact_match"] if truth_captions is not None else []
    return {"n": n, **{k: (tally[k] / n if n else 0.0) for k in keys}}


def _objects_match(pred: list[tuple[str, str | None]], truth: list[tuple[str, str]]) -> bool:
    if len(pred) != len(truth):
        return False
    left = Counter(truth)
    for cls, col in sorted(pred, key=lambda o: o[1] is None):  # coloured ones claim first
        if col is not None:
            if left[(cls, col)] <= 0:
                return False
            left[(cls, col)] -= 1
        else:
            hit = next((k for k, v in left.items() if k[0] == cls and v > 0), None)
            if hit is None:
                return False
            left[hit] -= 1
    return True


def _rel_equal(a: tuple, b: tuple) -> bool:
    (oa, ra, ob), (ta, rb, tb) = a, b
    same = lambda p, t: p[0] == t[0] and (p[1] is None or p[1] == t[1])  # noqa: E731
    return ra == rb and same(oa, ta) and same(ob, tb)
