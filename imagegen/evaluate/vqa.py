"""DPG-Bench / VQA-style prompt adherence (Hu et al. 2024, "ELLA: Equip Diffusion Models with LLM
for Enhanced Semantic Alignment"; the benchmark's ``dpg_bench/compute_dpg_bench.py``), with a
pluggable VQA model.

**Question format** (``dpg_bench.csv``): one row per question, columns ``item_id`` (the prompt id,
also the image's file stem), ``text`` (the prompt), ``keywords``, ``proposition_id`` (the question
id within the prompt), ``dependency`` (comma-separated parent question ids; ``0`` = none),
``category_broad``, ``category_detailed``, ``tuple`` (e.g. ``entity - whole (cat)``: its part before
``(`` is the category, the part before ``-`` the top-level category) and
``question_natural_language`` (the yes/no question).  :func:`read_dpg_questions` reads it.

**Scoring rules** (re-implemented from the official script):

1. every question of a prompt is asked about each image; it scores 1 when the answer is exactly
   ``yes`` (after lower-casing and stripping; the official mPLUG answers in lower case), else 0;
2. in question order, a question whose parent (any listed, ``0`` ignored) scores 0 is set to 0
   (in place, so a zeroed parent zeroes its own children after it);
3. an image's score is the mean over its questions; a prompt's is the mean over its images
   (officially ``pic_num`` crops of a 2 x 2 grid: :func:`split_grid`); DPG-Bench = 100 x the mean over prompts;
4. category scores average the per-question scores *before* step 2 (as the official script
   does), by ``tuple`` category and by its top-level part.

Two differences from the official script, both stated in the result: it skips the CSV's first
data row (``if i == 0: continue``, dropping one question of the first prompt; the official loop
then fails on that prompt's children with a KeyError and leaves the prompt out) - ``skip_first_row=True``
drops the row and the dependencies on it; and its category scores use only the last crop of each prompt, here
all images count.  The official VQA model is mPLUG-large (modelscope); any transformers
image-text-to-text model can answer here (:class:`TransformersVQA`), so scores from another model
are not comparable with published DPG-Bench numbers (the result says which model answered).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
from PIL import Image

Answerer = Callable[[Image.Image, str], str]
OFFICIAL_VQA = "mPLUG-large (damo/mplug_visual-question-answering_coco_large_en)"


class DpgFormatError(ValueError):
    """A DPG-Bench question file is malformed (says the file, the row and the problem)."""


@dataclass
class DpgPrompt:
    item_id: str
    text: str
    questions: dict[int, str] = field(default_factory=dict)
    tuples: dict[int, str] = field(default_factory=dict)
    dependencies: dict[int, list[int]] = field(default_factory=dict)


REQUIRED = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")


def read_dpg_questions(path: str | Path, *, skip_first_row: bool = False) -> dict[str, DpgPrompt]:
    """The prompts of a DPG-Bench csv, keyed by ``item_id`` in file order, every row checked."""
    p = Path(path)
    if not p.is_file():
        raise DpgFormatError(f"DPG-Bench question file {p} does not exist")
    out: dict[str, DpgPrompt] = {}
    skipped: set[tuple[str, int]] = set()
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DpgFormatError(f"{p}: missing column(s) {missing}; has {reader.fieldnames}")
        for i, row in enumerate(reader):
            line = i + 2  # the header is line 1
            if skip_first_row and i == 0:
                skipped.add((str(row["item_id"]).strip(), int(row["proposition_id"])))
                continue
            try:
                qid = int(row["proposition_id"])
                deps = [int(d.strip()) for d in str(row["dependency"]).split(",") if d.strip()]
            except ValueError as exc:
                raise DpgFormatError(f"{p}, line {line}: proposition_id / dependency must be integers ({exc})") from None
            if not row["question_natural_language"].strip():
                raise DpgFormatError(f"{p}, line {line}: empty question")
            item = str(row["item_id"]).strip()
            prompt = out.setdefault(item, DpgPrompt(item, str(row.get("text") or "")))
            if qid in prompt.questions:
                raise DpgFormatError(f"{p}, line {line}: question {qid} of item {item} appears twice")
            prompt.questions[qid] = row["question_natural_language"].strip()
            prompt.tuples[qid] = str(row["tuple"])
            prompt.dependencies[qid] = deps
    if not out:
        raise DpgFormatError(f"{p} holds no questions")
    for item, pr in out.items():
        for qid, deps in pr.dependencies.items():
            pr.dependencies[qid] = deps = [d for d in deps if (item, d) not in skipped]
            bad = [d for d in deps if d != 0 and d not in pr.questions]
            if bad:
                raise DpgFormatError(f"{p}: item {item} question {qid} depends on unknown question(s) {bad}")
    return out


def category(tuple_text: str) -> str:
    """``entity - whole (cat)`` -> ``entity - whole``."""
    return tuple_text.split("(")[0].strip()


def split_grid(image: Image.Image, resolution: int, pic_num: int = 4) -> list[Image.Image]:
    """The official crops of a 2 x 2 grid of ``resolution``-px images, first ``pic_num`` of them."""
    boxes = [(0, 0, resolution, resolution), (resolution, 0, 2 * resolution, resolution),
             (0, resolution, resolution, 2 * resolution), (resolution, resolution, 2 * resolution, 2 * resolution)]
    if not 1 <= pic_num <= 4:
        raise ValueError(f"pic_num must be 1..4, got {pic_num}")
    return [image.crop(b) for b in boxes[:pic_num]]


def normalise_answer(answer: str) -> str:
    return re.sub(r"[^\w\s]", "", str(answer)).strip().lower()


def score_answers(prompt: DpgPrompt, answers: Mapping[int, str]) -> tuple[float, dict[int, float], dict[int, float]]:
    """``(image score, scores after the dependency rule, scores before it)`` for one image's answers."""
    raw = {qid: float(normalise_answer(answers[qid]) == "yes") for qid in prompt.questions}
    scores = dict(raw)
    for qid, parents in prompt.dependencies.items():  # in question order, in place (as the official loop)
        if any(p != 0 and scores[p] == 0 for p in parents):
            scores[qid] = 0.0
    return float(sum(scores.values()) / len(scores)), scores, raw


def dpg_score(prompts: Mapping[str, DpgPrompt], images: Mapping[str, Sequence[Image.Image]], answerer: Answerer,
              *, model_name: str = "custom") -> dict[str, Any]:
    """DPG-Bench over ``images`` (item id -> that prompt's images) with ``answerer(image, question)``.

    Every prompt in ``prompts`` needs images (an unscored prompt would bias the mean); per-prompt
    rows keep each question's answer.
    """
    missing = [k for k in prompts if k not in images or not images[k]]
    if missing:
        raise ValueError(f"{len(missing)} DPG-Bench prompts have no images (first: {missing[:5]})")
    per_prompt, rows = [], []
    cat: dict[str, list[float]] = {}
    for item, pr in prompts.items():
        img_scores = []
        for k, im in enumerate(images[item]):
            answers = {qid: answerer(im, q) for qid, q in pr.questions.items()}
            s, after, before = score_answers(pr, answers)
            img_scores.append(s)
            for qid, v in before.items():
                cat.setdefault(category(pr.tuples[qid]), []).append(v)
            rows.append({"item_id": item, "image": k, "score": s, "answers": answers, "scores": after})
        per_prompt.append(float(np.mean(img_scores)))
    l1: dict[str, list[float]] = {}
    for c, v in cat.items():
        l1.setdefault(c.split("-")[0].strip(), []).extend(v)
    return {"metric": "DPG-Bench", "value": 100.0 * float(np.mean(per_prompt)), "n_prompts": len(per_prompt),
            "per_prompt": dict(zip(prompts, per_prompt)), "rows": rows,
            "categories": {c: 100.0 * float(np.mean(v)) for c, v in sorted(cat.items())},
            "categories_l1": {c: 100.0 * float(np.mean(v)) for c, v in sorted(l1.items())},
            "vqa_model": model_name, "comparable_with_published": False if model_name != OFFICIAL_VQA else True,
            "note": (f"answered by {model_name}, not the official {OFFICIAL_VQA}: not comparable with published "
                     f"DPG-Bench numbers" if model_name != OFFICIAL_VQA else None)}


class TransformersVQA:
    """A transformers image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``,
    hub name or ``save_pretrained`` folder) as a DPG-Bench answerer.

    The question goes into the processor's chat template as one user turn (an image, then the
    question followed by ``suffix``).  ``mode="generate"``: greedy decoding of at most
    ``max_new_tokens`` tokens, the answer is the decoded text (the official script's comparison
    applies).  ``mode="yes_no"``: one forward pass, the answer is ``yes`` when the next-token logit of
    ``yes`` beats that of ``no`` (robust to chatty models; :meth:`p_yes` gives the probability).
    """

    def __init__(self, model_name_or_path: str | Path, *, mode: Literal["generate", "yes_no"] = "generate",
                 suffix: str = " Answer yes or no.", max_new_tokens: int = 8, device: str = "cpu") -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from imagegen.evaluate.hf_models import load_pretrained, load_processor, weights_identity

        if mode not in ("generate", "yes_no"):
            raise ValueError(f"mode must be 'generate' or 'yes_no', got {mode!r}")
        self.model = load_pretrained(AutoModelForImageTextToText, model_name_or_path, what="VQA model weights",
                                     device=device)
        self.processor = load_processor(AutoProcessor, model_name_or_path, what="VQA processor")
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"{model_name_or_path}: the processor has no chat template; save one with the "
                             f"processor (processor.chat_template = ...; save_pretrained)")
        self.mode, self.suffix, self.max_new_tokens, self.device = mode, suffix, int(max_new_tokens), device
        self.name = str(model_name_or_path)
        self.identity = {**weights_identity(model_name_or_path), "mode": mode, "suffix": suffix}
        tok = self.processor.tokenizer
        self._yes_no = [self._first_token(tok, w) for w in ("yes", "no")] if mode == "yes_no" else None

    @staticmethod
    def _first_token(tok: Any, word: str) -> int:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if not ids or ids[0] == tok.unk_token_id:
            raise ValueError(f"the VQA tokenizer has no token for {word!r}; use mode='generate'")
        return int(ids[0])

    def inputs(self, image: Image.Image, question: str) -> Any:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + self.suffix}]}]
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        return self.processor(images=image.convert("RGB"), text=text, return_tensors="pt").to(self.device)

    def p_yes(self, image: Image.Image, question: str) -> float:
        """softmax over the (yes, no) next-token logits."""
        import torch

        ids = self._yes_no or [self._first_token(self.processor.tokenizer, w) for w in ("yes", "no")]
        with torch.inference_mode():
            logits = self.model(**self.inputs(image, question)).logits[0, -1].float()
        return float(torch.softmax(logits[ids], dim=0)[0])

    def __call__(self, image: Image.Image, question: str) -> str:
        import torch

        if self.mode == "yes_no":
            return "yes" if self.p_yes(image, question) > 0.5 else "no"
        inp = self.inputs(image, question)
        with torch.inference_mode():
            out = self.model.generate(**inp, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
