"""DPG-Bench scoring (question file, dependency rule, categories) with a rule-based answerer written
here, and the transformers VQA answerer on a tiny random LLaVA saved with save_pretrained."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from _eval_models import tiny_llava
from PIL import Image

from imagegen.evaluate import vqa as Q

COLUMNS = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
           "tuple", "question_natural_language"]
ROWS = [
    ("p1", "a red cat left of a dog", "cat", 1, "0", "entity", "whole", "entity - whole (cat)", "Is there a cat?"),
    ("p1", "a red cat left of a dog", "dog", 2, "0", "entity", "whole", "entity - whole (dog)", "Is there a dog?"),
    ("p1", "a red cat left of a dog", "red", 3, "1", "attribute", "color", "attribute - color (cat, red)",
     "Is the cat red?"),
    ("p1", "a red cat left of a dog", "left", 4, "1,2", "relation", "spatial", "relation - spatial (cat, dog, left of)",
     "Is the cat left of the dog?"),
    ("p1", "a red cat left of a dog", "red", 5, "3", "attribute", "texture", "attribute - texture (cat, red)",
     "Is the red cat furry?"),
    ("p2", "a blue dog", "dog", 1, "0", "entity", "whole", "entity - whole (dog)", "Is there a dog?"),
    ("p2", "a blue dog", "blue", 2, "1", "attribute", "color", "attribute - color (dog, blue)", "Is the dog blue?"),
]


def _csv(path, rows=ROWS):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return path


def test_read_dpg_questions_and_errors(tmp_path):
    prompts = Q.read_dpg_questions(_csv(tmp_path / "dpg.csv"))
    assert list(prompts) == ["p1", "p2"] and prompts["p1"].dependencies[4] == [1, 2]
    assert Q.category(prompts["p1"].tuples[4]) == "relation - spatial"
    official = Q.read_dpg_questions(tmp_path / "dpg.csv", skip_first_row=True)  # the official script's skip
    assert 1 not in official["p1"].questions
    bad = _csv(tmp_path / "bad.csv", ROWS[:1] + [("p1", "t", "k", "x", "0", "", "", "entity - whole (a)", "Q?")])
    with pytest.raises(Q.DpgFormatError, match="line 3"):
        Q.read_dpg_questions(bad)
    dangling = _csv(tmp_path / "dangling.csv", [ROWS[0][:4] + ("7",) + ROWS[0][5:]])
    with pytest.raises(Q.DpgFormatError, match=r"depends on unknown question\(s\) \[7\]"):
        Q.read_dpg_questions(dangling)


def test_dependency_rule_and_scores_by_hand(tmp_path):
    prompts = Q.read_dpg_questions(_csv(tmp_path / "dpg.csv"))
    # a rule-based answerer: image 0 shows a red cat and no dog; image 1 a red furry cat and a dog, cat right of dog
    truth = [{"Is there a cat?", "Is the cat red?", "Is the red cat furry?", "Is the cat left of the dog?"},
             {"Is there a cat?", "Is there a dog?", "Is the cat red?", "Is the red cat furry?", "Is the dog blue?"}]

    def answer(image, question):
        return "Yes." if question in truth[image.getpixel((0, 0))[0]] else "no"

    ims = [Image.new("RGB", (4, 4), (k, 0, 0)) for k in (0, 1)]
    out = Q.dpg_score(prompts, {"p1": ims, "p2": ims[1:]}, answer, model_name="rules")
    rows = {(r["item_id"], r["image"]): r for r in out["rows"]}
    # image 0 of p1: q1 yes, q2 no, q3 yes, q4 "yes" but its parent q2 failed -> 0, q5 yes (parent q3 passed)
    assert rows[("p1", 0)]["scores"] == {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 1.0}
    # image 1: all but q4 (the cat is not left of the dog)
    assert rows[("p1", 1)]["scores"] == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0}
    assert out["per_prompt"]["p1"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert out["per_prompt"]["p2"] == 1.0
    assert out["value"] == pytest.approx(100 * ((0.7 + 1.0) / 2))
    # categories use the scores before the dependency rule: relation - spatial was answered yes once of two
    assert out["categories"]["relation - spatial"] == pytest.approx(50.0)
    assert out["categories_l1"]["entity"] == pytest.approx(100 * 4 / 5)
    assert out["comparable_with_published"] is False and "rules" in out["note"]
    with pytest.raises(ValueError, match="have no images"):
        Q.dpg_score(prompts, {"p1": ims}, answer)
    # the in-place rule: a zeroed parent zeroes its children after it (q3 -> q5)
    s, after, _ = Q.score_answers(prompts["p1"], {1: "no", 2: "yes", 3: "yes", 4: "yes", 5: "yes"})
    assert after == {1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0} and s == pytest.approx(0.2)


def test_split_grid():
    grid = Image.new("RGB", (8, 8))
    for k, (x, y) in enumerate([(0, 0), (4, 0), (0, 4), (4, 4)]):
        grid.paste((k * 60, 0, 0), (x, y, x + 4, y + 4))
    crops = Q.split_grid(grid, 4, 4)
    assert [c.getpixel((1, 1))[0] for c in crops] == [0, 60, 120, 180]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("vqa") / "tiny-llava")


def test_transformers_vqa_on_a_tiny_random_llava(llava_dir, tmp_path, one_torch_thread):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    q = "is there a cat ?"
    yes_no = Q.TransformersVQA(llava_dir, mode="yes_no")
    # independent: the model's next-token logits for "yes" and "no" after the chat-formatted question
    model, proc = AutoModelForImageTextToText.from_pretrained(llava_dir).eval(), AutoProcessor.from_pretrained(llava_dir)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": q + " Answer yes or no."}]}],
                                    add_generation_prompt=True)
    assert text.startswith("user : <image> is there a cat ?")
    with torch.no_grad():
        logits = model(**proc(images=image, text=text, return_tensors="pt")).logits[0, -1]
    vocab = proc.tokenizer.get_vocab()
    ly, ln = float(logits[vocab["yes"]]), float(logits[vocab["no"]])
    assert yes_no.p_yes(image, q) == pytest.approx(1 / (1 + np.exp(ln - ly)), abs=1e-5)
    assert yes_no(image, q) == ("yes" if ly > ln else "no")
    gen = Q.TransformersVQA(llava_dir, mode="generate", max_new_tokens=3)
    answer = gen(image, q)
    assert isinstance(answer, str)
    # end to end over a question file
    prompts = Q.read_dpg_questions(_csv(tmp_path / "dpg.csv"))
    out = Q.dpg_score(prompts, {"p1": [image], "p2": [image]}, yes_no, model_name=yes_no.name)
    assert 0.0 <= out["value"] <= 100.0 and len(out["rows"]) == 2
    assert out["vqa_model"] == str(llava_dir) and yes_no.identity["weights"]
