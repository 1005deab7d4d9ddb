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


def stage_identity(cfg: object) -> dict[str, object]:
    """What a filter stage id must hash beyond its config: this package's source and each
    configured filter's model/list identity (file sha256s, package versions).

    ``cfg`` is a :class:`imagegen.stages.filter.FilterConfig`."""
    import pkgutil

    from imagegen.hashing import code_version, module_source
    from imagegen.stages.filter import build_filters

    # every module of the package, by its source text: read, not imported (aesthetic_mlp and the
    # model filters import torch), so a filter stage found done loads none of them
    names = sorted(f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name != "__main__")
    mods = [module_source(n) for n in names]
    ident = {f.name: f.identity() for f in build_filters(cfg) if hasattr(f, "identity")}  # type: ignore[arg-type]
    return {"code": code_version(*mods), "models": {k: v for k, v in ident.items() if v}}
