"""An open-vocabulary GenEval detector through transformers: OWLv2 (Minderer et al. 2023, "Scaling
Open-Vocabulary Object Detection"), for users who cannot install the official mmdet 2.x +
Mask2Former stack (CUDA only).  It is a :class:`imagegen.evaluate.geneval.Detector`: it returns
``Det`` rows that :func:`imagegen.evaluate.geneval.evaluate_image` / ``score_folder`` score with the
official rules, next to ``WorldDetector`` and ``TorchvisionDetector``.

**Not comparable with published GenEval numbers.**  GenEval's published scores come from
Mask2Former (Swin-S, COCO) with its own calibration; OWLv2's confidences, boxes and misses differ,
and it gives no masks (the colour classifier then sees the whole box).  Every result carries
``comparable_with_published = False`` and :data:`NOT_COMPARABLE_NOTE`; report such a score as
"GenEval (OWLv2)", never next to published GenEval figures.

How detections are formed (each step stated, since the official detector has no counterpart):

1. The text queries are ``template.format(class)`` for every class (GenEval's 80 COCO names by
   default); OWLv2 pads the image to a square (bottom/right) and predicts one box per patch.
2. Each box takes its best-matching query (sigmoid of the max logit, transformers'
   ``post_process_object_detection`` rule); boxes scoring at or below ``score_floor`` are dropped.
3. Per class, non-maximum suppression at IoU ``nms_iou`` (OWL predicts many boxes per object;
   Mask2Former's outputs are already one per object, and GenEval's own NMS is off by default).
4. Per class, the detections are ordered the way ``evaluate_images.py`` orders them,
   ``np.argsort(scores)[::-1]`` over the detector's output order: among equal confidences the
   *later* one comes first (:func:`official_order`).  ``filter_detections`` sorts stably by score,
   so this order survives into scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from imagegen.evaluate.geneval import COCO_TO_GENEVAL, Det

DEFAULT_MODEL = "google/owlv2-base-patch16-ensemble"
TEMPLATE = "a photo of a {}"
NOT_COMPARABLE_NOTE = ("GenEval scored with an OWLv2 open-vocabulary detector (transformers), not the official "
                       "Mask2Former: not comparable with published GenEval numbers")


def geneval_classes() -> list[str]:
    """GenEval's 80 object names: COCO's categories with GenEval's three renames (torchvision's list)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    cats = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [COCO_TO_GENEVAL.get(c, c) for c in cats if c not in ("__background__", "N/A")]


def official_order(scores: Sequence[float]) -> np.ndarray:
    """Indices by decreasing score as GenEval's ``np.argsort(scores)[::-1]``: ties keep the later first.

    A stable ascending sort reversed; numpy's default quicksort agrees with it on the small arrays
    a detector gives per class (and is not specified for ties on large ones).
    """
    return np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")[::-1]


class OwlDetector:
    """OWLv2 by hub name or ``save_pretrained`` folder (model + processor), as a GenEval detector."""

    comparable_with_published = False
    note = NOT_COMPARABLE_NOTE

    def __init__(self, model_name_or_path: str | Path = DEFAULT_MODEL, classes: Sequence[str] | None = None, *,
                 template: str = TEMPLATE, score_floor: float = 0.1, nms_iou: float | None = 0.5,
                 device: str = "cpu") -> None:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        from imagegen.evaluate.hf_models import load_pretrained, load_processor, weights_identity

        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the class name, got {template!r}")
        self.classes = list(classes) if classes is not None else geneval_classes()
        if not self.classes:
            raise ValueError("OwlDetector needs at least one class")
        self.model = load_pretrained(Owlv2ForObjectDetection, model_name_or_path, what="OWLv2 weights", device=device)
        self.processor = load_processor(Owlv2Processor, model_name_or_path, what="OWLv2 processor")
        self.device = device
        self.template, self.score_floor, self.nms_iou = template, float(score_floor), nms_iou
        self.name = "owlv2"
        self.identity = {**weights_identity(model_name_or_path), "template": template, "score_floor": score_floor,
                         "nms_iou": nms_iou, "classes": len(self.classes), "comparable_with_published": False,
                         "note": NOT_COMPARABLE_NOTE}
        import torch

        with torch.inference_mode():  # the text queries are the same for every image: encode them once
            self._text = self.processor(text=[template.format(c) for c in self.classes], return_tensors="pt",
                                        padding="max_length", truncation=True)

    def raw(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, labels, boxes)`` of every predicted box, in the model's output order; boxes in pixels."""
        import torch

        rgb = image.convert("RGB")
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            out = self.model(input_ids=self._text["input_ids"].to(self.device),
                             attention_mask=self._text["attention_mask"].to(self.device), pixel_values=pixels)
        logits = out.logits[0].float()  # (boxes, queries)
        best = logits.max(dim=-1)
        scores = torch.sigmoid(best.values).cpu().numpy().astype(np.float64)
        labels = best.indices.cpu().numpy()
        cx, cy, w, h = out.pred_boxes[0].float().cpu().numpy().T
        side = float(max(rgb.size))  # OWLv2 pads to a square on the bottom/right: one scale for both axes
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * side
        boxes = np.clip(boxes, 0.0, [rgb.width, rgb.height, rgb.width, rgb.height])
        return scores, labels, boxes

    def __call__(self, image: Image.Image) -> list[Det]:
        import torch
        from torchvision.ops import nms

        scores, labels, boxes = self.raw(image)
        dets: list[Det] = []
        for c in np.unique(labels[scores > self.score_floor]):
            idx = np.flatnonzero((labels == c) & (scores > self.score_floor))
            if self.nms_iou is not None and len(idx) > 1:
                kept = nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]), float(self.nms_iou)).numpy()
                idx = np.sort(idx[kept])  # back to the model's output order before the official ordering
            for i in idx[official_order(scores[idx])]:
                dets.append(Det(class_name=self.classes[int(c)], score=float(scores[i]),
                                box=[float(v) for v in boxes[i]]))
        return dets


def result_flags(detector: Any) -> dict[str, Any]:
    """What a GenEval row must say about its detector: its name, identity, and comparability."""
    comparable = bool(getattr(detector, "comparable_with_published", False))
    name = getattr(detector, "name", type(detector).__name__)
    generic = (f"GenEval scored with the {name} detector, not the official Mask2Former: not comparable with "
               f"published GenEval numbers")
    return {"detector": name, "detector_identity": getattr(detector, "identity", None),
            "comparable_with_published": comparable,
            "note": None if comparable else getattr(detector, "note", generic)}
