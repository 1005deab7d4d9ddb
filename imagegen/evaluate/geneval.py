"""GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment"): prompt files, the official scoring rules, a pluggable detector, the image layout.

Rules, as the official ``evaluation/evaluate_images.py`` applies them (re-implemented here):

* detections per class are kept when their confidence is ``> 0.3`` (``> 0.9`` for ``counting``
  prompts), most confident first, at most 16 per class (no NMS: the official default);
* ``include`` clauses combine with AND: each needs at least ``count`` kept detections of its
  class; its ``color`` is judged on the ``count`` most confident of them by a colour classifier
  (all of them must read as the colour); its ``position = [relation, j]`` compares each of them
  with each object matched by clause ``j`` (which must itself have passed);
* ``exclude`` clauses combine with OR: ``{class, count}`` fails when ``>= count`` are kept
  (a counting prompt "three X" has ``include X>=3`` and ``exclude X>=4``: exactly three);
* relative position of A to B: centre offset ``A - B`` per axis, shrunk towards 0 by
  ``0.1 * (width_A + width_B)`` (heights for y), divided by the norm of the raw offset; a
  component below -0.5 / above 0.5 reads "left of" / "right of" ("above" / "below", y down);
* per-task accuracy over images; overall = unweighted mean of the six task accuracies.

The colour classifier of the official method is CLIP zero-shot over the ten colour names with
three templates, on the box crop with pixels outside the object's mask painted gray (#999999);
``clip_color_classifier`` does that with any open_clip model.  The embedded world's parts (its
prompt file, its pixel detector, which reads colours itself for ``detector_color``, and the
oracle renderer) are in :mod:`imagegen.world.geneval`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Protocol, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {cls}",
    "a photo of a {color}-colored {cls}",
    "a photo of a {color} object",
)
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
GRAY_BACKGROUND = "#999999"
# torchvision's COCO category names -> GenEval's object names (the other 77 agree).
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


class GenEvalPromptError(ValueError):
    """A prompt (metadata) line is not valid GenEval metadata."""


# ----------------------------------------------------------------------------------- prompts

Count = Annotated[int, Field(strict=True, ge=1, le=1000)]
ClauseIndex = Annotated[int, Field(strict=True, ge=0)]


class IncludeClause(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    class_: str = Field(alias="class", min_length=1, description="object class name")
    count: Count = Field(description="at least this many detections of the class")
    color: Literal[GENEVAL_COLORS] | None = Field(  # type: ignore[valid-type]
        default=None, description="colour of the `count` most confident detections")
    position: tuple[Literal[RELATIONS], ClauseIndex] | None = Field(  # type: ignore[valid-type]
        default=None, description="[relation, index of an earlier include clause]")


class ExcludeClause(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    class_: str = Field(alias="class", min_length=1)
    count: Count = Field(description="fails when at least this many are detected")


class GenEvalPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tag: Literal[TASKS]  # type: ignore[valid-type]
    include: list[IncludeClause] = Field(min_length=1)
    exclude: list[ExcludeClause] | None = None
    prompt: str = Field(min_length=1)

    @model_validator(mode="after")
    def _positions_point_back(self) -> GenEvalPrompt:
        for i, clause in enumerate(self.include):
            if clause.position is not None and clause.position[1] >= i:
                raise ValueError(
                    f"include[{i}].position refers to clause {clause.position[1]}, which is not an "
                    f"earlier include clause (0..{i - 1})")
        return self

    def to_metadata(self) -> dict[str, Any]:
        """The official JSON object (key order tag, include, exclude, prompt; absent keys left out)."""
        inc = []
        for c in self.include:
            d: dict[str, Any] = {"class": c.class_, "count": c.count}
            if c.color is not None:
                d["color"] = c.color
            if c.position is not None:
                d["position"] = [c.position[0], c.position[1]]
            inc.append(d)
        out: dict[str, Any] = {"tag": self.tag, "include": inc}
        if self.exclude is not None:
            out["exclude"] = [{"class": c.class_, "count": c.count} for c in self.exclude]
        out["prompt"] = self.prompt
        return out


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(line)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_prompt(metadata: dict[str, Any] | GenEvalPrompt, where: str = "metadata") -> GenEvalPrompt:
    """Validate one metadata object; errors start with ``where`` (e.g. "prompts.jsonl, line 3")."""
    if isinstance(metadata, GenEvalPrompt):
        return metadata
    if not isinstance(metadata, dict):
        raise GenEvalPromptError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    try:
        return GenEvalPrompt.model_validate(metadata)
    except ValidationError as exc:
        raise GenEvalPromptError(f"{where}: {_describe(exc)}") from None


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read a GenEval metadata file (one JSON object per line); blank lines are skipped.

    Every line is validated; the first bad one raises GenEvalPromptError naming the file, the
    line number and what is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise GenEvalPromptError(f"prompt file {p} does not exist")
    out: list[dict[str, Any]] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GenEvalPromptError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            out.append(parse_prompt(obj, where).to_metadata())
    if not out:
        raise GenEvalPromptError(f"prompt file {p} holds no prompts")
    return out


def write_prompts(path: str | Path, prompts: Iterable[dict[str, Any]]) -> Path:
    """Write prompts (validated) as GenEval metadata jsonl, atomically."""
    p = Path(path)
    lines = [json.dumps(parse_prompt(m, f"prompt {i}").to_metadata()) for i, m in enumerate(prompts)]
    if not lines:
        raise GenEvalPromptError("write_prompts: no prompts to write")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


# ---------------------------------------------------------------------------------- detections


@dataclass
class Det:
    """One detection: class, confidence, ``box = [x0, y0, x1, y1]`` in pixels, optional mask
    (bool, image height x width) and optional colour read by the detector itself."""

    class_name: str
    score: float
    box: list[float]
    mask: np.ndarray | None = field(default=None, repr=False)
    color: str | None = None


class Detector(Protocol):
    def __call__(self, image: Image.Image) -> list[Det]: ...


ColorFn = Callable[[Image.Image | None, Det], str]


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relations of box A to box B (image y grows downward): the world's own rule,
    ``imagegen.world.scene.geneval_relations``, which both the scene generator and scoring use."""
    from imagegen.world.scene import geneval_relations

    return geneval_relations(list(box_a), list(box_b), threshold)


def filter_detections(detections: Iterable[Det], tag: str, *, threshold: float = THRESHOLD,
                      counting_threshold: float = COUNTING_THRESHOLD,
                      max_objects: int = MAX_OBJECTS) -> dict[str, list[Det]]:
    """Per class, detections with score above the prompt's threshold, most confident first, capped."""
    cut = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Det]] = {}
    for d in detections:
        if float(d.score) > cut:
            by_class.setdefault(d.class_name, []).append(d)
    return {c: sorted(ds, key=lambda d: -float(d.score))[:max_objects] for c, ds in by_class.items()}


def evaluate_image(
    metadata: dict[str, Any] | GenEvalPrompt,
    detections: Iterable[Det],
    color_fn: ColorFn | None = None,
    image: Image.Image | None = None,
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str, dict[str, list[list[float]]]]:
    """Score one image's raw detections against one prompt: ``(correct, reason, details)``.

    ``reason`` lists every failed check, one per line (empty when correct); ``details`` maps each
    class to its kept detections as ``[x0, y0, x1, y1, score]`` (the official ``details``).
    ``color_fn(image, det)`` is called only for clauses with a colour.
    """
    p = parse_prompt(metadata)
    kept = filter_detections(detections, p.tag, threshold=threshold,
                             counting_threshold=counting_threshold, max_objects=max_objects)
    correct = True
    reasons: list[str] = []
    matched: list[list[Det] | None] = []
    for req in p.include:
        cls, count = req.class_, req.count
        found = kept.get(cls, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if req.color is not None:
                if color_fn is None:
                    raise ValueError(f"prompt {p.prompt!r} checks colour but no color_fn was given")
                colors = [color_fn(image, d) for d in found]
                n_ok = colors.count(req.color)
                if n_ok < count:
                    ok = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                    reasons.append(f"expected {req.color} {cls}>={count}, found {n_ok} {req.color}; and {seen}")
            if req.position is not None and ok:
                rel, target = req.position
                targets = matched[target]
                if targets is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for d in found:
                        for t in targets:
                            got = relative_position(d.box, t.box, position_threshold)
                            if rel not in got:
                                ok = False
                                reasons.append(f"expected {cls} {rel} target, found "
                                               f"{' and '.join(sorted(got)) or 'no relation to the'} target")
                                break
                        if not ok:
                            break
        correct &= ok
        matched.append(found if ok else None)
    for ex in p.exclude or []:
        n = len(kept.get(ex.class_, []))
        if n >= ex.count:
            correct = False
            reasons.append(f"expected {ex.class_}<{ex.count}, found {n}")
    details = {c: [[float(v) for v in d.box[:4]] + [float(d.score)] for d in ds] for c, ds in kept.items()}
    return correct, "\n".join(reasons), details


# ---------------------------------------------------------------------------- colour readers


def detector_color(image: Image.Image | None, det: Det) -> str:
    """The colour the detector itself read (the world detector's pixel colour)."""
    if det.color is None:
        raise ValueError(f"detection {det.class_name} at {det.box} carries no colour; use a colour "
                         f"classifier such as clip_color_classifier")
    return det.color


def masked_crop(image: Image.Image, det: Det, bgcolor: str = GRAY_BACKGROUND, crop: bool = True) -> Image.Image:
    """The official colour-classifier input: pixels outside ``det.mask`` painted ``bgcolor``,
    then the box cropped (box corners rounded, as PIL's crop does)."""
    rgb = image.convert("RGB")
    if det.mask is not None:
        mask = np.asarray(det.mask, dtype=bool)
        if mask.shape != (rgb.height, rgb.width):
            raise ValueError(f"mask of {det.class_name} has shape {mask.shape}, image is "
                             f"{rgb.height}x{rgb.width}")
        blank = Image.new("RGB", rgb.size, color=bgcolor)
        rgb = Image.composite(rgb, blank, Image.fromarray(mask))
    if crop:
        rgb = rgb.crop(tuple(int(round(float(v))) for v in det.box[:4]))
    return rgb


def clip_color_classifier(
    clip_spec: Any, device: str = "cpu", *, colors: Sequence[str] = GENEVAL_COLORS,
    templates: Sequence[str] = COLOR_TEMPLATES, bgcolor: str = GRAY_BACKGROUND, crop: bool = True,
) -> ColorFn:
    """GenEval's colour classifier with any open_clip model (official: ViT-L-14 ``openai``).

    Zero-shot over ``colors``: per class name, each colour's embedding is the renormalised mean
    of its templates' text embeddings; the image is :func:`masked_crop`; the colour with the
    highest cosine wins.  Class embeddings are cached per class name.
    """
    from imagegen.clip import encode_images, encode_texts, load_clip

    clip = load_clip(clip_spec, device)
    cache: dict[str, np.ndarray] = {}

    def class_matrix(cls: str) -> np.ndarray:
        if cls not in cache:
            rows = []
            for c in colors:
                e = encode_texts(clip, [t.format(color=c, cls=cls) for t in templates]).mean(axis=0)
                rows.append(e / max(float(np.linalg.norm(e)), 1e-12))
            cache[cls] = np.stack(rows)
        return cache[cls]

    def color_fn(image: Image.Image | None, det: Det) -> str:
        if image is None:
            raise ValueError("clip_color_classifier needs the image (evaluate_image(..., image=...))")
        emb = encode_images(clip, [masked_crop(image, det, bgcolor, crop)])
        return str(colors[int(np.argmax(emb[0] @ class_matrix(det.class_name).T))])

    color_fn.identity = dict(clip.identity)  # type: ignore[attr-defined]
    return color_fn


# ---------------------------------------------------------------------------------- detectors


class DetectorWeightsMissingError(FileNotFoundError):
    """A detector's weights file is not on this machine."""


_TV_ARCHS = {
    "maskrcnn_resnet50_fpn": ("maskrcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights"),
    "maskrcnn_resnet50_fpn_v2": ("maskrcnn_resnet50_fpn_v2", "MaskRCNN_ResNet50_FPN_V2_Weights"),
}


class TorchvisionDetector:
    """torchvision Mask R-CNN (COCO) from a local weights file, class names mapped to GenEval's.

    ``weights_path``: a ``.safetensors`` state dict or torchvision's own ``.pth`` (loaded with
    ``weights_only=True``).  Nothing is downloaded.  Extra keyword arguments go to the torchvision
    builder (e.g. ``min_size``/``max_size`` of its internal resize).  Masks are the model's soft
    masks above ``mask_threshold``.
    """

    def __init__(self, weights_path: str | Path, arch: str = "maskrcnn_resnet50_fpn",
                 device: str = "cpu", mask_threshold: float = 0.5, **builder_kwargs: Any) -> None:
        import torch
        import torchvision.models.detection as tvd

        if arch not in _TV_ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {list(_TV_ARCHS)}")
        build_name, weights_name = _TV_ARCHS[arch]
        weights_enum = getattr(tvd, weights_name).COCO_V1
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise DetectorWeightsMissingError(
                f"{arch} weights {path} do not exist. On a machine with internet, download "
                f"{weights_enum.url} (torchvision's {weights_name}.COCO_V1; e.g. `python -c \"import "
                f"torchvision; torchvision.models.get_weight('{weights_name}.COCO_V1').get_state_dict()\"` "
                f"puts it in {torch.hub.get_dir()}/checkpoints/) and copy the file to {path}.")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = getattr(tvd, build_name)(weights=None, weights_backbone=None, num_classes=91, **builder_kwargs)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path} is not a {arch} COCO state dict: {str(exc)[:500]}") from None
        self.model = model.eval().to(device)
        self.device = device
        self.mask_threshold = float(mask_threshold)
        self.categories = [COCO_TO_GENEVAL.get(c, c) for c in weights_enum.meta["categories"]]
        self.name = f"torchvision-{arch}"
        self.identity = {"arch": arch, "weights_file": str(path)}

    def __call__(self, image: Image.Image) -> list[Det]:
        import torch
        from torchvision.transforms.functional import to_tensor

        x = to_tensor(image.convert("RGB")).to(self.device)
        with torch.inference_mode():
            out = self.model([x])[0]
        dets = []
        masks = out.get("masks")
        for k in range(len(out["scores"])):
            name = self.categories[int(out["labels"][k])]
            if name in ("__background__", "N/A"):
                continue
            mask = None if masks is None else (masks[k, 0] > self.mask_threshold).cpu().numpy()
            dets.append(Det(class_name=name, score=float(out["scores"][k]),
                            box=[float(v) for v in out["boxes"][k].tolist()], mask=mask))
        return dets


# ------------------------------------------------------------------------ layout and scoring

_SAMPLE_RE = re.compile(r"^\d+\.png$")
MakeImages = Callable[[dict[str, Any], int, int], Sequence[Image.Image]]


def generate_layout(out_dir: str | Path, prompts: Sequence[dict[str, Any]], n_per_prompt: int,
                    make_images: MakeImages) -> dict[str, int]:
    """Write the official layout: ``NNNNN/metadata.jsonl`` (the prompt's JSON) and
    ``NNNNN/samples/XXXX.png``.

    ``make_images(metadata, n, prompt_index)`` returns ``n`` PIL images.  A prompt folder that is
    already complete (same metadata, ``n`` samples) is kept, so an interrupted run resumes; a
    folder holding a different prompt is an error.  Images are written atomically.
    """
    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    metas = [parse_prompt(m, f"prompt {i}").to_metadata() for i, m in enumerate(prompts)]
    if not metas:
        raise ValueError("generate_layout: no prompts")
    root = Path(out_dir)
    written = skipped = 0
    for i, meta in enumerate(metas):
        folder = root / f"{i:05d}"
        samples = folder / "samples"
        meta_path = folder / "metadata.jsonl"
        text = json.dumps(meta)
        if meta_path.is_file():
            if json.loads(meta_path.read_text()) != meta:
                raise ValueError(f"{meta_path} holds another prompt than prompt {i} ({meta['prompt']!r}); "
                                 f"use an empty output folder")
            if all((samples / f"{k:04d}.png").is_file() for k in range(n_per_prompt)):
                skipped += 1
                continue
        images = list(make_images(meta, n_per_prompt, i))
        if len(images) != n_per_prompt:
            raise ValueError(f"make_images returned {len(images)} images for prompt {i}, expected {n_per_prompt}")
        samples.mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"make_images returned {type(im).__name__} for prompt {i} image {k}, not a PIL image")
            dest = samples / f"{k:04d}.png"
            tmp = samples / f".{k:04d}.png.tmp-{os.getpid()}"
            im.save(tmp, format="PNG")
            os.replace(tmp, dest)
        tmp_meta = folder / f".metadata.jsonl.tmp-{os.getpid()}"
        tmp_meta.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp_meta, meta_path)
        written += 1
    return {"prompts": len(metas), "written": written, "skipped": skipped,
            "images": len(metas) * n_per_prompt}


def layout_items(out_dir: str | Path) -> list[tuple[Path, dict[str, Any], list[Path]]]:
    """``(folder, metadata, sample paths)`` per prompt folder of a layout, checked before scoring."""
    root = Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"GenEval image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise ValueError(f"{root} has no prompt folders (NNNNN/metadata.jsonl + NNNNN/samples/XXXX.png)")
    items = []
    for f in folders:
        meta_path = f / "metadata.jsonl"
        if not meta_path.is_file():
            raise ValueError(f"{f} has no metadata.jsonl")
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise GenEvalPromptError(f"{meta_path}: not valid JSON ({exc.msg})") from None
        meta = parse_prompt(raw, str(meta_path)).to_metadata()
        samples = sorted(p for p in (f / "samples").glob("*.png") if _SAMPLE_RE.match(p.name))
        if not samples:
            raise ValueError(f"{f / 'samples'} holds no images named like 0000.png")
        items.append((f, meta, samples))
    return items


def score_folder(out_dir: str | Path, detector: Detector, color_fn: ColorFn | None = None,
                 outfile: str | Path | None = None, **rules: Any) -> list[dict[str, Any]]:
    """Score every image of a layout: rows in the official per-image format.

    Row keys: ``filename``, ``tag``, ``prompt``, ``correct``, ``reason``, ``metadata`` (JSON
    string) and ``details`` (JSON string), as ``evaluate_images.py`` writes them, so its
    ``summary_scores.py`` reads ``outfile``.  ``rules`` go to :func:`evaluate_image`.
    """
    from imagegen.evaluate.images import open_rgb

    rows = []
    for _, meta, samples in layout_items(out_dir):
        for path in samples:
            image = open_rgb(path)
            correct, reason, details = evaluate_image(meta, detector(image), color_fn, image, **rules)
            rows.append({"filename": str(path), "tag": meta["tag"], "prompt": meta["prompt"],
                         "correct": bool(correct), "reason": reason, "metadata": json.dumps(meta),
                         "details": json.dumps(details)})
    if outfile is not None:
        write_results(outfile, rows)
    return rows


def write_results(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, p)
    return p


def read_results(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-task accuracy (over images) and overall = unweighted mean of the task accuracies.

    ``complete`` is False when some of the six tasks have no rows (they are listed in
    ``missing_tasks`` and the overall is then the mean over ``overall_tasks`` only).  Tags that
    are not GenEval tasks are reported under ``tasks`` but left out of the overall.
    """
    if not rows:
        raise ValueError("summarize: no result rows")
    per: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for i, r in enumerate(rows):
        if "tag" not in r or "correct" not in r:
            raise ValueError(f"result row {i} lacks 'tag' or 'correct': {sorted(r)}")
        per.setdefault(str(r["tag"]), []).append(bool(r["correct"]))
        key = r.get("metadata")
        key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
        prompts[key] = prompts.get(key, False) or bool(r["correct"])
    order = [t for t in TASKS if t in per] + sorted(t for t in per if t not in TASKS)
    tasks = {t: {"accuracy": float(np.mean(per[t])), "correct": int(sum(per[t])), "images": len(per[t])}
             for t in order}
    present = [t for t in TASKS if t in per]
    missing = [t for t in TASKS if t not in per]
    all_correct = [c for v in per.values() for c in v]
    return {
        "overall": float(np.mean([tasks[t]["accuracy"] for t in present])) if present else math.nan,
        "overall_tasks": present,
        "missing_tasks": missing,
        "complete": not missing,
        "tasks": tasks,
        "images": len(all_correct),
        "prompts": len(prompts),
        "correct_images": float(np.mean(all_correct)),
        "correct_prompts": float(np.mean(list(prompts.values()))),
    }
