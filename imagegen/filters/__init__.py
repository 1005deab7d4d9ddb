"""Model-backed and list-based filters, one module each, all on the contract of :mod:`.base`.

- :mod:`.nsfw`: NudeNet's ONNX detector (shipped in the ``nudenet`` wheel), labels and threshold
  configurable.
- :mod:`.ocr`: RapidOCR (PP-OCRv4, ONNX, shipped in ``rapidocr-onnxruntime``): fraction of the image
  covered by text boxes, and the recognised text.
- :mod:`.aesthetic`: LAION's aesthetic predictor (MLP on CLIP ViT-L/14 image embeddings), by path.
- :mod:`.watermark`: a timm/torchvision watermark classifier, by path (LAION's detector preset).
- :mod:`.blocklist`: known-bad perceptual or sha256 hashes, matched within a Hamming radius
  through :mod:`imagegen.mih`.

``python -m imagegen.filters convert-aesthetic|convert-watermark`` turns published ``.pth`` state
dicts into the safetensors files these filters load (tensors only, ``torch.load(weights_only=True)``).
The CLIP zero-shot prompts in :mod:`imagegen.stages.filter` stay available as a heuristic.
"""

from imagegen.filters.base import FilterModelError, ScoringFilter, StageAdapter, as_stage_filter

__all__ = ["FilterModelError", "ScoringFilter", "StageAdapter", "as_stage_filter"]
