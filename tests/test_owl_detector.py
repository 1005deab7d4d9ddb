"""The OWLv2 GenEval detector on a tiny random OWLv2 saved with save_pretrained, and the official
tie order (``np.argsort(scores)[::-1]``: the later of two equal scores first) through scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _eval_models import tiny_owlv2
from PIL import Image

from imagegen.evaluate import geneval as G
from imagegen.world import geneval as WG
from imagegen.evaluate import owl_detector as O


def test_official_order_puts_the_later_of_equal_scores_first():
    assert O.official_order([0.5, 0.9, 0.5, 0.7]).tolist() == [1, 3, 2, 0]
    # what GenEval's script computes, on arrays small enough for numpy's sort to be deterministic
    for scores in ([0.4, 0.4], [0.8, 0.3, 0.8, 0.8], [1.0, 0.2, 0.2, 1.0, 0.5]):
        assert O.official_order(scores).tolist() == np.argsort(np.asarray(scores))[::-1].tolist()


def test_tie_order_survives_into_geneval_scoring():
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    raw = [0.8, 0.8, 0.5]  # two equal-confidence cats: the detector's output order is A then B
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    order = O.official_order(raw)
    dets = [G.Det("cat", raw[i], boxes[i]) for i in order]
    _, _, details = G.evaluate_image(meta, dets)
    assert [d[:4] for d in details["cat"]] == [[20, 20, 30, 30], [0, 0, 10, 10], [40, 40, 50, 50]]


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    return tiny_owlv2(tmp_path_factory.mktemp("owl") / "tiny-owlv2")


def test_owl_detector_on_a_tiny_random_owlv2(owl_dir, one_torch_thread):
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    classes = ["cat", "dog", "red circle"]
    det = O.OwlDetector(owl_dir, classes, score_floor=0.0, nms_iou=None)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # not square: padded
    dets = det(image)
    # independent: the processor's own post-processing on the padded square gives the same boxes and scores
    model = Owlv2ForObjectDetection.from_pretrained(owl_dir).eval()
    proc = Owlv2Processor.from_pretrained(owl_dir)
    inputs = proc(text=[[f"a photo of a {c}" for c in classes]], images=image, return_tensors="pt",
                  padding="max_length", truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    ref = proc.post_process_grounded_object_detection(out, threshold=0.0, target_sizes=[(64, 64)])[0]
    assert len(dets) == len(ref["scores"])
    ref_boxes = ref["boxes"].clamp(min=0).numpy().clip(max=[64, 48, 64, 48])
    theirs = sorted((round(float(s), 5), classes[int(c)], tuple(np.round(b, 2))) for s, c, b in
                    zip(ref["scores"], ref["labels"], ref_boxes))
    ours = sorted((round(d.score, 5), d.class_name, tuple(np.round(d.box, 2))) for d in dets)
    assert [t[:2] for t in ours] == [t[:2] for t in theirs]
    assert np.allclose([t[2] for t in ours], [t[2] for t in theirs], atol=0.02)
    for c in classes:  # per class the official order: non-increasing scores
        s = [d.score for d in dets if d.class_name == c]
        assert s == sorted(s, reverse=True)
    assert all(0 <= d.box[0] <= d.box[2] <= 64 and 0 <= d.box[1] <= d.box[3] <= 48 for d in dets)
    # NMS keeps fewer; every row says the score is not comparable with published GenEval
    assert len(O.OwlDetector(owl_dir, classes, score_floor=0.0, nms_iou=0.3)(image)) < len(dets)
    flags = O.result_flags(det)
    assert flags["comparable_with_published"] is False and "not comparable" in flags["note"]
    assert flags["detector_identity"]["weights"]
    assert O.result_flags(WG.WorldDetector())["comparable_with_published"] is False


def test_owl_detector_scores_a_geneval_layout(owl_dir, tmp_path, one_torch_thread):
    prompts = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
               {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
                "prompt": "a photo of two dogs"}]
    rng = np.random.default_rng(1)
    G.generate_layout(tmp_path, prompts, 2, lambda m, n, i: [Image.fromarray(
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)])
    rows = G.score_folder(tmp_path, O.OwlDetector(owl_dir, ["cat", "dog"]))
    assert len(rows) == 4 and {r["tag"] for r in rows} == {"single_object", "counting"}
    assert G.summarize(rows)["images"] == 4


def test_geneval_classes_are_the_80_names():
    names = O.geneval_classes()
    assert len(names) == 80 and "computer mouse" in names and "mouse" not in names
