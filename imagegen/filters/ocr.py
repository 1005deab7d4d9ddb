"""Rendered text in images: OCR with RapidOCR (``rapidocr-onnxruntime``, models shipped in its wheel).

RapidOCR runs PaddleOCR's PP-OCRv4 text detector (DB) and recogniser (CRNN) as ONNX models on ONNX
Runtime, offline.  The score of a row is the fraction of the image covered by the union of its
text boxes, counting only boxes whose recognised text has at least ``min_chars`` letters or digits
and a recognition score of at least ``min_text_score`` (so a lone "+" or "*" read off a drawn
cross or star does not count); a row fails when that fraction exceeds ``max_text_fraction``.  The
recognised words are kept as an extra column (``text_ocr_text``) for the manifest.

Small images are upscaled (bicubic) so their longer side is ``det_side`` before detection: the
detector was trained on text a few tens of pixels high, and at 64 px a word is 10-16 px tall.
Larger images are detected at their own size up to ``max_det_side``.

Why not Tesseract: on the embedded world's planted words (64 px, 14-22 px Pillow font, placed off
the objects) Debian's tesseract 5.3 (through tesserocr, best of page-segmentation modes 3/6/11,
2-6x upscaling, Otsu) read 80-90 % of them; RapidOCR read all of them with no false positive on
clean scenes (measured while choosing; see the README's filter section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.filters.base import FilterModelError, RowResults, cached_model, pass_below


class OcrConfig(BaseModel):
    """OCR text filter: reject a row whose text boxes cover more than ``max_text_fraction``."""

    model_config = ConfigDict(extra="forbid")

    max_text_fraction: float = Field(0.05, ge=0, le=1, description="Largest fraction of the image text boxes "
                                     "may cover (0: any counted text rejects the row)")
    min_text_score: float = Field(0.5, ge=0, le=1, description="Recognition confidence for a box to count")
    min_chars: int = Field(2, ge=1, le=100, description="Letters/digits a box's text needs to count")
    det_side: int = Field(256, ge=32, le=4096, description="Smaller images are upscaled to this longer side")
    max_det_side: int = Field(1024, ge=32, le=8192, description="Larger images are detected at most at this side")
    threads: int = Field(1, ge=1, le=256, description="ONNX Runtime intra-op threads per process")

    @model_validator(mode="after")
    def _sides(self) -> "OcrConfig":
        if self.det_side > self.max_det_side:
            raise ValueError(f"det_side ({self.det_side}) must be <= max_det_side ({self.max_det_side})")
        return self


def _build_engine(max_det_side: int, threads: int) -> Any:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        raise FilterModelError(
            "the OCR filter needs 'rapidocr-onnxruntime' (setup.sh installs it with --no-deps: its "
            "'opencv-python' requirement would replace the opencv-python-headless build that provides cv2 "
            "here; pip install --no-deps rapidocr-onnxruntime==1.4.4 pyclipper shapely)") from exc
    return RapidOCR(det_limit_side_len=max_det_side, det_limit_type="max", use_cls=False,
                    intra_op_num_threads=threads, inter_op_num_threads=1, text_score=0.0)


def load_engine(cfg: OcrConfig) -> Any:
    return cached_model(("rapidocr", cfg.max_det_side, cfg.threads),
                        lambda: _build_engine(cfg.max_det_side, cfg.threads))


@dataclass
class OcrBox:
    quad: list[list[float]]  # 4 corner points in the pixels of the image as given
    text: str
    score: float


def _count_chars(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


@dataclass
class OcrFilter:
    cfg: OcrConfig = field(default_factory=OcrConfig)
    name: str = "text_ocr"
    _rows: RowResults = field(default_factory=RowResults, repr=False)

    def read(self, image: Image.Image) -> tuple[list[OcrBox], float]:
        """Counted text boxes of one image and the fraction of it they cover."""
        engine = load_engine(self.cfg)
        im = image.convert("RGB")
        w, h = im.size
        side = max(w, h)
        scale = 1.0
        if side < self.cfg.det_side:
            scale = self.cfg.det_side / side
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        result, _ = engine(im, use_cls=False)
        boxes = []
        for quad, text, score in result or []:
            text = str(text)
            if float(score) >= self.cfg.min_text_score and _count_chars(text) >= self.cfg.min_chars:
                boxes.append(OcrBox([[float(x) / scale, float(y) / scale] for x, y in quad], text, float(score)))
        if not boxes:
            return boxes, 0.0
        mask = Image.new("L", im.size, 0)
        draw = ImageDraw.Draw(mask)
        for b in boxes:
            draw.polygon([(x * scale, y * scale) for x, y in b.quad], fill=255)
        return boxes, float(np.count_nonzero(np.asarray(mask)) / (mask.width * mask.height))

    def _read_all(self, data: Any) -> list[tuple[list[OcrBox], float]]:
        rows = [self.read(im) for im in data.images]
        self._rows.put(data, rows)
        return rows

    def score(self, data: Any) -> np.ndarray:
        return np.array([frac for _, frac in self._read_all(data)], dtype=np.float64)

    def decide(self, scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return pass_below(scores, self.cfg.max_text_fraction, inclusive=True)

    def extra_columns(self, data: Any) -> dict[str, np.ndarray]:
        rows = self._rows.get(data) or self._read_all(data)
        return {f"{self.name}_text": np.array([" | ".join(b.text for b in boxes) for boxes, _ in rows], dtype=object)}

    def identity(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"rapidocr_onnxruntime": version("rapidocr-onnxruntime"), "onnxruntime": version("onnxruntime")}
