"""Loading transformers models for evaluation: by hub name (from the local cache when offline) or
by local folder, safetensors only, with the weights' identity recorded.

Every transformers-backed metric (FD-DINOv2, the OWLv2 GenEval detector, the VQA scorer,
PickScore, ImageReward's BLIP towers) loads through :func:`load_pretrained`, so the code the
tests run on tiny random models saved with ``save_pretrained`` is the code real weights take.

* ``name_or_path`` is a hub repo id (``facebook/dinov2-large``) or a folder holding
  ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``).
* Pickled weights (``pytorch_model.bin``) are never loaded: ``use_safetensors=True`` is passed,
  and the error says how to convert them on a machine you trust.
* Offline (``HF_HUB_OFFLINE=1``, the project's offline switch) a hub name is looked up in the
  Hugging Face cache only (``local_files_only=True``); a miss names the repo and how to pre-place it.
* :func:`weights_identity` hashes ``config.json`` and every safetensors file the model was built
  from, so a metric row pins the exact weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imagegen.hashing import file_sha256

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


class ModelWeightsMissingError(FileNotFoundError):
    """The weights a metric names are not on this machine (and could not be fetched)."""


def offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _how_to_preplace(name: str, what: str) -> str:
    return (f"Pre-place the {what}: on a machine with internet run `huggingface-cli download {name}` "
            f"(or `python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{name}')"
            f".save_pretrained('DIR', safe_serialization=True)\"`) and copy the Hugging Face cache "
            f"(~/.cache/huggingface/hub or $HF_HOME) here with HF_HUB_OFFLINE=1 set, or pass the "
            f"saved folder DIR as the model path")


def _arg(name_or_path: str | Path) -> str:
    """A folder as its expanded path, a hub name as it is (what from_pretrained gets)."""
    p = Path(str(name_or_path)).expanduser()
    return str(p) if p.is_dir() else str(name_or_path)


def resolve_file(name_or_path: str | Path, filename: str) -> Path | None:
    """The local path of ``filename`` of a model folder or a cached hub repo, or None."""
    p = Path(str(name_or_path)).expanduser()
    if p.is_dir():
        f = p / filename
        return f if f.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id=str(name_or_path), filename=filename)
    except Exception:  # not a valid repo id
        return None
    return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


def weights_files(name_or_path: str | Path) -> list[Path]:
    """The safetensors file(s) a model folder / cached repo holds (the shards of an index)."""
    single = resolve_file(name_or_path, SAFE_WEIGHTS)
    if single is not None:
        return [single]
    index = resolve_file(name_or_path, SAFE_INDEX)
    if index is None:
        return []
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = [resolve_file(name_or_path, s) for s in shards]
    return [f for f in out if f is not None]


def weights_identity(name_or_path: str | Path, *, extra_files: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"model", "config_sha256", "weights": {file name: sha256}}`` of a model folder or cached repo."""
    out: dict[str, Any] = {"model": str(name_or_path)}
    cfg = resolve_file(name_or_path, CONFIG)
    if cfg is not None:
        out["config_sha256"] = file_sha256(cfg)
    out["weights"] = {f.name: file_sha256(f) for f in weights_files(name_or_path)}
    for name in extra_files:
        f = resolve_file(name_or_path, name)
        if f is not None:
            out.setdefault("files", {})[name] = file_sha256(f)
    try:
        import transformers

        out["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def check_available(name_or_path: str | Path, what: str = "model weights") -> None:
    """Raise ModelWeightsMissingError (naming the model and the fix) when it cannot be loaded here."""
    p = Path(str(name_or_path)).expanduser()
    looks_local = p.exists() or str(name_or_path).startswith(("/", ".", "~"))
    if looks_local:
        if not p.is_dir():
            raise ModelWeightsMissingError(f"{what}: folder {p} does not exist (a model folder holds "
                                           f"{CONFIG} and {SAFE_WEIGHTS}, as save_pretrained writes them)")
        if not (p / CONFIG).is_file():
            raise ModelWeightsMissingError(f"{what}: {p} has no {CONFIG}; is it a save_pretrained folder?")
        if not weights_files(p):
            pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt*")]
            hint = (f" It holds pickled weights ({', '.join(sorted(pickled))}), which are never loaded: on a "
                    f"machine you trust, load the model and save it again with save_pretrained("
                    f"DIR, safe_serialization=True).") if pickled else ""
            raise ModelWeightsMissingError(f"{what}: {p} has no {SAFE_WEIGHTS} (or {SAFE_INDEX}).{hint}")
        return
    if offline() and not weights_files(name_or_path):
        raise ModelWeightsMissingError(
            f"{what}: {name_or_path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
            f"{_how_to_preplace(str(name_or_path), what)}")


def load_pretrained(cls: Any, name_or_path: str | Path, *, what: str = "model weights",
                    device: str = "cpu", **kwargs: Any) -> Any:
    """``cls.from_pretrained(name_or_path, use_safetensors=True)`` in eval mode on ``device``,
    offline-aware; errors name the model and how to pre-place it."""
    check_available(name_or_path, what)
    try:
        model = cls.from_pretrained(_arg(name_or_path), use_safetensors=True, local_files_only=offline(), **kwargs)
    except OSError as exc:
        raise ModelWeightsMissingError(f"{what}: cannot load {name_or_path} ({exc}). "
                                       f"{_how_to_preplace(str(name_or_path), what)}") from exc
    return model.eval().to(device).requires_grad_(False)


def load_processor(cls: Any, name_or_path: str | Path, *, what: str = "processor", **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for a processor / tokenizer / image processor, offline-aware."""
    try:
        return cls.from_pretrained(_arg(name_or_path), local_files_only=offline(), **kwargs)
    except OSError as exc:
        raise ModelWeightsMissingError(f"{what}: cannot load {name_or_path} ({exc}). "
                                       f"{_how_to_preplace(str(name_or_path), what)}") from exc
