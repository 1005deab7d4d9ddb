"""NSFW detection with NudeNet (the ``nudenet`` package, whose wheel ships its ONNX detector).

NudeNet 3.4 is a YOLOv8-style body-part detector (``nudenet/320n.onnx`` inside the wheel, 12 MB,
320x320 input; a larger 640 px model, ``640m.onnx``, is published separately and can be given by
path).  It returns boxes for 18 labels, exposed and covered.  The score of a row is the highest
detection score among the configured labels (0 when none is detected; NudeNet itself drops
detections under 0.2), and a row fails when that score reaches ``threshold``.

Images go through NudeNet's own preprocessing and post-processing (``NudeDetector.detect_batch``:
pad to square, resize to the model side, class-agnostic NMS), in batches, on a session created
once per process per (model file, resolution, threads).  ONNX Runtime's CPU results were measured
identical for 1, 2 and 4 intra-op threads, so ``threads`` is an execution setting only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imagegen.filters.base import (FilterModelError, RowResults, batches, cached_model, file_sha256,
                                   pass_below, require_file)

NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
# Explicit nudity: the exposed sexual body parts (NudeNet's own "unsafe" reading of its labels).
EXPLICIT_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)


class NudeNetConfig(BaseModel):
    """NudeNet detector: reject a row when any configured label is detected with score >= threshold."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(None, description="ONNX detector file; None: the 320n.onnx shipped in "
                                   "the nudenet wheel (offline)")
    resolution: int = Field(320, ge=32, le=2048, description="Model input side (320 for 320n, 640 for 640m)")
    labels: list[str] = Field(default_factory=lambda: list(EXPLICIT_LABELS), min_length=1,
                              description="NudeNet labels that make a row unsafe")
    threshold: float = Field(0.5, ge=0.2, le=1.0, description="Detection score at which a row is rejected "
                             "(NudeNet reports nothing under 0.2)")
    batch_size: int = Field(16, ge=1, le=1024)
    threads: int = Field(1, ge=1, le=256, description="ONNX Runtime intra-op threads per process "
                         "(results do not depend on it)")

    @field_validator("labels")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in NUDENET_LABELS]
        if bad:
            raise ValueError(f"unknown NudeNet labels {bad}; choose from {list(NUDENET_LABELS)}")
        return v


def default_model_path() -> str:
    try:
        import nudenet
    except ImportError as exc:
        raise FilterModelError("the NSFW filter needs the 'nudenet' package (pip install nudenet)") from exc
    return os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")


def _build_detector(model_path: str, resolution: int, threads: int) -> Any:
    import onnxruntime as ort
    from nudenet import NudeDetector

    det = NudeDetector(model_path=model_path, inference_resolution=resolution)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # the same model, on a session whose thread count we choose (NudeDetector takes no options)
    det.onnx_session = ort.InferenceSession(model_path, sess_options=so, providers=["CPUExecutionProvider"])
    det.input_name = det.onnx_session.get_inputs()[0].name
    return det


def load_detector(cfg: NudeNetConfig) -> Any:
    path = str(require_file(cfg.model_path, "NudeNet model", (".onnx",))) if cfg.model_path else default_model_path()
    return cached_model(("nudenet", os.path.realpath(path), cfg.resolution, cfg.threads),
                        lambda: _build_detector(path, cfg.resolution, cfg.threads))


@dataclass
class NudeNetFilter:
    cfg: NudeNetConfig = field(default_factory=NudeNetConfig)
    name: str = "nsfw_nudenet"
    _rows: RowResults = field(default_factory=RowResults, repr=False)

    def detect(self, images: list[Any]) -> list[list[dict[str, Any]]]:
        """NudeNet's detections per image (PIL RGB images in, lists of {class, score, box} out)."""
        det = load_detector(self.cfg)
        out: list[list[dict[str, Any]]] = []
        for _, chunk in batches(images, self.cfg.batch_size):
            # NudeNet reads arrays in OpenCV's BGR order, as cv2.imread gives them
            arrays = [np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1]) for im in chunk]
            out.extend(det.detect_batch(arrays, batch_size=len(arrays)))
        return out

    def score(self, data: Any) -> np.ndarray:
        found = self.detect(data.images)
        self._rows.put(data, found)
        wanted = set(self.cfg.labels)
        return np.array([max((d["score"] for d in ds if d["class"] in wanted), default=0.0) for ds in found],
                        dtype=np.float64)

    def decide(self, scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return pass_below(scores, self.cfg.threshold)

    def extra_columns(self, data: Any) -> dict[str, np.ndarray]:
        found = self._rows.get(data)
        if found is None:
            found = self.detect(data.images)
        text = [json.dumps([{"label": d["class"], "score": round(float(d["score"]), 4), "box": d["box"]}
                            for d in ds], separators=(",", ":")) for ds in found]
        return {f"{self.name}_detections": np.array(text, dtype=object)}

    def identity(self) -> dict[str, Any]:
        from importlib.metadata import version

        path = self.cfg.model_path or default_model_path()
        return {"nudenet": version("nudenet"), "onnxruntime": version("onnxruntime"),
                "model_sha256": file_sha256(path)}
