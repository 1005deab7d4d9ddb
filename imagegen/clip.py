"""CLIP models named by a spec string, loaded and used through open_clip only.

Every CLIP in the project - a public checkpoint, a folder of project-built weights, the world's
reference CLIP - goes through ``open_clip.create_model_and_transforms`` and
``open_clip.get_tokenizer``, so whoever brings real weights uses exactly the code the tests use.

Spec strings::

    ViT-B-32:laion2b_s34b_b79k          open_clip architecture + pretrained tag
    ViT-B-32:/models/b32.safetensors    open_clip architecture + local checkpoint file
    hf-hub:org/repo                     an open_clip repo on the Hugging Face hub (or its cache)
    local-dir:/models/my_clip           a folder with open_clip_config.json + weights (hub layout)
    world                               alias; the caller resolves it to the reference CLIP folder

Weights are never unpickled by default: ``.bin``/``.pt``/``.pth`` files are refused unless the
caller passes ``allow_pickle=True``.  Even torch's ``weights_only`` loader is a restricted
unpickler that has had bypasses (CVE-2025-32434), and a downloaded checkpoint is untrusted input;
safetensors is plain tensor data.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass, field
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from imagegen.determinism import DEFAULT_THREADS, torch_threads
from imagegen.hashing import file_sha256

WORLD_ALIAS = "world"
HF_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
PICKLE_WEIGHTS_NAME = "open_clip_pytorch_model.bin"  # open_clip.constants.HF_WEIGHTS_NAME
# Suffixes whose loading runs no unpickler: safetensors, and big_vision numpy archives (SigLIP),
# which open_clip reads with np.load (allow_pickle=False by default).
SAFE_SUFFIXES = (".safetensors", ".npz")
_CHECKPOINT_SUFFIXES = (".safetensors", ".npz", ".bin", ".pt", ".pth", ".ckpt")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ClipSpecError(ValueError):
    """A CLIP spec string is malformed or names something open_clip does not know."""


class ClipWeightsMissingError(FileNotFoundError):
    """The weights a spec names are not on this machine (and could not be fetched)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint would have to be unpickled and the caller did not allow it."""


class ClipSpec(BaseModel):
    """A parsed spec: which open_clip call it turns into, and a canonical string for caching/ids."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["pretrained", "checkpoint", "hf-hub", "local-dir"] = Field(
        description="pretrained: name + tag; checkpoint: name + local file; hf-hub: hub repo; "
        "local-dir: folder in the hub layout"
    )
    model_name: str | None = Field(
        default=None, description="open_clip architecture (pretrained/checkpoint kinds)"
    )
    tag: str | None = Field(default=None, description="open_clip pretrained tag (pretrained kind)")
    path: Path | None = Field(
        default=None, description="absolute checkpoint file (checkpoint) or folder (local-dir)"
    )
    repo: str | None = Field(default=None, description="org/repo on the Hugging Face hub")

    def __str__(self) -> str:
        if self.kind == "pretrained":
            return f"{self.model_name}:{self.tag}"
        if self.kind == "checkpoint":
            return f"{self.model_name}:{self.path}"
        if self.kind == "hf-hub":
            return f"{HF_PREFIX}{self.repo}"
        return f"{LOCAL_DIR_PREFIX}{self.path}"

    def open_clip_args(self) -> tuple[str, str | None]:
        """``(model_name, pretrained)`` as open_clip.create_model_and_transforms takes them."""
        if self.kind == "pretrained":
            return str(self.model_name), self.tag
        if self.kind == "checkpoint":
            return str(self.model_name), str(self.path)
        return str(self), None

    def tokenizer_name(self) -> str:
        return str(self.model_name) if self.kind in ("pretrained", "checkpoint") else str(self)


def _known_models() -> list[str]:
    return list(open_clip.list_models())


def _check_model_name(name: str, spec: str) -> None:
    if not _NAME_RE.match(name):
        raise ClipSpecError(f"CLIP spec {spec!r}: {name!r} is not a valid open_clip model name")
    known = _known_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ClipSpecError(
            f"CLIP spec {spec!r}: unknown open_clip architecture {name!r}{hint} "
            f"(see open_clip.list_models(); hub repos are written hf-hub:org/repo, "
            f"folders local-dir:/path)"
        )


def _looks_like_path(value: str) -> bool:
    return (
        "/" in value
        or "\\" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def parse_spec(spec: str | ClipSpec, aliases: Mapping[str, str] | None = None) -> ClipSpec:
    """Parse a spec string; raise ClipSpecError saying what is wrong with it.

    ``aliases`` maps names such as ``"world"`` to a full spec; the world alias is resolved by the
    caller (``imagegen.world.reference_clip.world_clip_spec``) because it needs the world config.
    """
    if isinstance(spec, ClipSpec):
        return spec
    if not isinstance(spec, str):
        raise ClipSpecError(f"CLIP spec must be a string, got {type(spec).__name__}")
    raw = spec.strip()
    if not raw:
        raise ClipSpecError("CLIP spec is empty; expected e.g. 'ViT-B-32:laion2b_s34b_b79k'")
    if aliases and raw in aliases:
        target = aliases[raw]
        if target in aliases:
            raise ClipSpecError(f"CLIP spec alias {raw!r} points to another alias {target!r}")
        return parse_spec(target)
    if raw == WORLD_ALIAS:
        raise ClipSpecError(
            "CLIP spec 'world' is an alias the caller must resolve: call "
            "imagegen.world.reference_clip.world_clip_spec(world_cfg, clip_cfg, models_root) "
            "or pass aliases={'world': 'local-dir:<folder>'}"
        )
    if raw.startswith(HF_PREFIX):
        repo = raw[len(HF_PREFIX):].strip().strip("/")
        if not _REPO_RE.match(repo):
            raise ClipSpecError(
                f"CLIP spec {spec!r}: after 'hf-hub:' expected 'org/repo', got {repo!r}"
            )
        return ClipSpec(kind="hf-hub", repo=repo)
    if raw.startswith(LOCAL_DIR_PREFIX):
        folder = raw[len(LOCAL_DIR_PREFIX):].strip()
        if not folder:
            raise ClipSpecError(f"CLIP spec {spec!r}: empty folder after 'local-dir:'")
        return ClipSpec(kind="local-dir", path=Path(folder).expanduser().resolve())
    if ":" not in raw:
        raise ClipSpecError(
            f"CLIP spec {spec!r} names no weights; write NAME:TAG (e.g. 'ViT-B-32:laion2b_s34b_b79k')"
            f", NAME:/path/to/weights.safetensors, hf-hub:org/repo or local-dir:/path "
            f"(a randomly initialised CLIP is never what an evaluation wants)"
        )
    name, _, weights = raw.partition(":")
    name, weights = name.strip(), weights.strip()
    if not name or not weights:
        raise ClipSpecError(f"CLIP spec {spec!r}: both NAME and the part after ':' are required")
    _check_model_name(name, spec)
    if _looks_like_path(weights):
        return ClipSpec(kind="checkpoint", model_name=name, path=Path(weights).expanduser().resolve())
    if not _TAG_RE.match(weights):
        raise ClipSpecError(f"CLIP spec {spec!r}: {weights!r} is neither a pretrained tag nor a path")
    tags = list(open_clip.list_pretrained_tags_by_model(name))
    if weights not in tags and weights.lower() in tags:
        weights = weights.lower()  # open_clip matches tags case-insensitively
    if weights not in tags:
        raise ClipSpecError(
            f"CLIP spec {spec!r}: {name} has no pretrained tag {weights!r}; known tags: "
            f"{', '.join(tags) or '(none)'}; for a local file write {name}:/path/to/weights.safetensors"
        )
    return ClipSpec(kind="pretrained", model_name=name, tag=weights)


# ---------------------------------------------------------------------------------------------
# Resolving weights before open_clip runs, so failures are clear and pickles are refused.


def _hf_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - hub not installed
        return False


def _check_safe(path: Path, spec: ClipSpec, allow_pickle: bool) -> None:
    if path.suffix.lower() in SAFE_SUFFIXES or allow_pickle:
        return
    raise UnsafeCheckpointError(
        f"CLIP spec {str(spec)!r}: weights {path} are a pickle-based file ({path.suffix}); loading "
        f"it would run torch's unpickler on untrusted data. Convert it to safetensors "
        f"(safetensors.torch.save_file(torch.load(p, weights_only=True), 'x.safetensors')) on a "
        f"machine you trust, or pass allow_pickle=True if you trust the file."
    )


def _missing(spec: ClipSpec, what: str, how: str) -> ClipWeightsMissingError:
    return ClipWeightsMissingError(f"CLIP spec {str(spec)!r}: {what}. {how}")


_HUB_HOW = (
    "Pre-place the weights: on a machine with internet run "
    "`python -c \"import open_clip; open_clip.create_model_and_transforms('{args}')\"` (or "
    "`huggingface-cli download {repo}`) and copy the Hugging Face cache (~/.cache/huggingface/hub "
    "or $HF_HOME) here, then set HF_HUB_OFFLINE=1; or download the .safetensors file and use "
    "the spec NAME:/path/to/file.safetensors, or a local-dir: folder."
)


def _hub_cached(repo: str, filenames: Sequence[str], cache_dir: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        hit = try_to_load_from_cache(repo_id=repo, filename=name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


def _weight_candidates(filename: str) -> list[str]:
    """The files open_clip tries, in its order: a .safetensors twin first (pretrained.py)."""
    out = []
    if filename == PICKLE_WEIGHTS_NAME:
        out.append(SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        out.append(filename[:-4] + ".safetensors")
    return out + [filename]


def _resolve_hub_file(
    spec: ClipSpec, repo: str, filename: str, cache_dir: str | None, fetch: Callable[[], str]
) -> Path:
    candidates = _weight_candidates(filename)
    hit = _hub_cached(repo, candidates, cache_dir)
    if hit is not None:
        return hit
    how = _HUB_HOW.format(args=str(spec), repo=repo)
    if _hf_offline():
        raise _missing(spec, f"none of {candidates} of hub repo {repo} is in the local cache "
                             f"(HF_HUB_OFFLINE is set)", how)
    try:
        return Path(fetch())
    except Exception as exc:  # network down, repo gone, auth...
        raise _missing(spec, f"could not fetch weights from hub repo {repo} ({exc})", how) from exc


def resolve_weights(
    spec: ClipSpec, *, allow_pickle: bool = False, cache_dir: str | None = None
) -> Path:
    """The local weights file open_clip will load for ``spec`` (downloading it if online)."""
    pretrained = open_clip.pretrained
    if spec.kind == "checkpoint":
        path = Path(str(spec.path))
        if not path.is_file():
            raise _missing(spec, f"checkpoint file {path} does not exist",
                           "Copy the weights there or fix the path.")
        _check_safe(path, spec, allow_pickle)
        return path
    if spec.kind == "local-dir":
        folder = Path(str(spec.path))
        if not folder.is_dir():
            raise _missing(spec, f"folder {folder} does not exist",
                           f"A local-dir holds {CONFIG_NAME} and {SAFE_WEIGHTS_NAME}.")
        if not (folder / CONFIG_NAME).is_file():
            raise _missing(spec, f"{folder} has no {CONFIG_NAME}",
                           f"A local-dir holds {CONFIG_NAME} and {SAFE_WEIGHTS_NAME}.")
        # Ask open_clip which file it will pick, so the safety check is on the file it loads.
        found = open_clip.factory._find_checkpoint_in_dir(folder)
        if not found:
            raise _missing(spec, f"{folder} has {CONFIG_NAME} but no weights file",
                           f"Put {SAFE_WEIGHTS_NAME} next to it.")
        path = Path(found)
        _check_safe(path, spec, allow_pickle)
        return path
    if spec.kind == "hf-hub":
        repo = str(spec.repo)
        _resolve_hub_file(
            spec, repo, CONFIG_NAME, cache_dir,
            lambda: pretrained.download_pretrained_from_hf(repo, filename=CONFIG_NAME,
                                                           cache_dir=cache_dir),
        )
        path = _resolve_hub_file(
            spec, repo, PICKLE_WEIGHTS_NAME, cache_dir,
            lambda: pretrained.download_pretrained_from_hf(repo, cache_dir=cache_dir),
        )
        _check_safe(path, spec, allow_pickle)
        return path
    # pretrained tag
    cfg = pretrained.get_pretrained_cfg(str(spec.model_name), str(spec.tag))
    if not cfg:
        raise ClipSpecError(f"CLIP spec {str(spec)!r}: open_clip has no config for this tag")
    if cfg.get("file"):
        path = Path(cfg["file"])
    elif cfg.get("hf_hub") and pretrained.has_hf_hub():
        # open_clip's convention: 'org/repo/' means the default file, 'org/repo/file' a named one.
        repo, filename = os.path.split(cfg["hf_hub"])
        path = _resolve_hub_file(
            spec, repo, filename or PICKLE_WEIGHTS_NAME, cache_dir,
            lambda: pretrained.download_pretrained(cfg, cache_dir=cache_dir),
        )
    elif cfg.get("url"):
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if not path.is_file():
            if _hf_offline():
                raise _missing(spec, f"{path} is not downloaded", f"Download {cfg['url']} to {path}.")
            try:
                path = Path(pretrained.download_pretrained(cfg, cache_dir=cache_dir))
            except Exception as exc:
                raise _missing(spec, f"could not download {cfg['url']} ({exc})",
                               f"Download it to {path} by hand.") from exc
    else:
        raise ClipSpecError(f"CLIP spec {str(spec)!r}: open_clip's tag config has no source")
    _check_safe(path, spec, allow_pickle)
    return path


# ---------------------------------------------------------------------------------------------
# Loading and encoding


@dataclass(eq=False)
class ClipModel:
    """A frozen open_clip model with its val transform and tokenizer.  Shared via a cache: do
    not modify ``model`` in place."""

    spec: ClipSpec
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device
    embed_dim: int
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def load_clip(
    spec: str | ClipSpec,
    device: str | torch.device = "cpu",
    *,
    allow_pickle: bool = False,
    cache_dir: str | Path | None = None,
) -> ClipModel:
    """Load a CLIP through open_clip, once per (spec, device, weights file) per process.

    The in-process cache is keyed by the files the spec resolves to (path, size, mtime, inode), not
    by the spec string alone: a long-lived process (a Dask worker, ``imagegen serve``) whose
    local-dir or checkpoint is rewritten loads the new weights, with their new sha256 in
    ``identity``, instead of answering with the old model."""
    parsed = parse_spec(spec)
    dev = torch.device(device)
    cdir = str(cache_dir) if cache_dir is not None else None
    weights = resolve_weights(parsed, allow_pickle=allow_pickle, cache_dir=cdir)
    files = [weights]
    if parsed.kind == "local-dir":
        files.append(Path(str(parsed.path)) / CONFIG_NAME)
    return _load_cached(str(parsed), str(dev), allow_pickle, cdir, tuple(_file_stamp(f) for f in files))


def _file_stamp(path: Path) -> tuple[str, int, int, int]:
    st = Path(path).stat()
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=8)
def _load_cached(spec_str: str, device: str, allow_pickle: bool, cache_dir: str | None,
                 stamp: tuple[tuple[str, int, int, int], ...]) -> ClipModel:
    spec = parse_spec(spec_str)
    weights = resolve_weights(spec, allow_pickle=allow_pickle, cache_dir=cache_dir)
    # For a tag, open_clip gets the tag (so it applies the tag's mean/std/quick_gelu); the
    # resolve step above has already placed the file in the cache open_clip reads from.
    name, pretrained = spec.open_clip_args()
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained,
            device=device,
            cache_dir=cache_dir,
            weights_only=True,
            require_pretrained=True,  # never fall back to random weights silently
        )
    except Exception as exc:  # safetensors/torch raise many types for a damaged or mismatched file
        raise ClipSpecError(f"CLIP spec {spec_str!r}: cannot load weights file {weights} "
                            f"({type(exc).__name__}: {exc}); is it complete and for model {name!r}?") from exc
    model.eval()
    model.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(spec.tokenizer_name())
    with torch.inference_mode():  # towers differ in where they keep the width: probe it
        embed_dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    identity: dict[str, Any] = {
        "spec": spec_str,
        "kind": spec.kind,
        "weights_file": str(weights),
        "weights_sha256": file_sha256(weights),
        "open_clip_version": open_clip.__version__,
    }
    if spec.kind == "local-dir":  # the folder's config shapes the model as much as its weights
        identity["config_sha256"] = file_sha256(Path(str(spec.path)) / CONFIG_NAME)
    return ClipModel(spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer,
                     device=torch.device(device), embed_dim=embed_dim, identity=identity)


def clear_clip_cache() -> None:
    """Drop the in-process model cache (e.g. after rewriting a local-dir in a test)."""
    _load_cached.cache_clear()


def _normalise(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.cpu().numpy().astype(np.float32, copy=False)


def encode_images(clip: ClipModel, images: Sequence[Image.Image], batch_size: int = 256,
                 threads: int = DEFAULT_THREADS) -> np.ndarray:
    """L2-normalised image embeddings, shape (N, D) float32, in input order.

    On CPU the forward runs on exactly ``threads`` torch threads, whatever the machine: the bits
    depend on the thread count (``imagegen.determinism``), and scores decide which rows stay."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray] = []
    pin = torch_threads(threads) if str(clip.device).startswith("cpu") else nullcontext()
    with pin, torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            for i, im in enumerate(chunk):
                if not isinstance(im, Image.Image):
                    raise TypeError(f"encode_images: item {start + i} is {type(im).__name__}, "
                                    f"not a PIL image")
            x = torch.stack([clip.preprocess(im) for im in chunk]).to(clip.device)
            out.append(_normalise(clip.model.encode_image(x)))
    if not out:
        return np.zeros((0, clip.embed_dim), dtype=np.float32)
    return np.concatenate(out)


def encode_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 1024,
                 threads: int = DEFAULT_THREADS) -> np.ndarray:
    """L2-normalised text embeddings, shape (N, D) float32, in input order (``threads``: as
    :func:`encode_images`)."""
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a list of strings, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray] = []
    pin = torch_threads(threads) if str(clip.device).startswith("cpu") else nullcontext()
    with pin, torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            for i, t in enumerate(chunk):
                if not isinstance(t, str):
                    raise TypeError(f"encode_texts: item {start + i} is {type(t).__name__}, not str")
            tokens = clip.tokenizer(chunk).to(clip.device)
            out.append(_normalise(clip.model.encode_text(tokens)))
    if not out:
        return np.zeros((0, clip.embed_dim), dtype=np.float32)
    return np.concatenate(out)


def cosine(img_emb: np.ndarray, txt_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of paired embeddings: out[i] = cos(img[i], txt[i])."""
    a = np.asarray(img_emb, dtype=np.float32)
    b = np.asarray(txt_emb, dtype=np.float32)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"cosine needs two (N, D) arrays of equal shape, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def zero_shot(
    clip: ClipModel,
    images: Sequence[Image.Image],
    class_prompts: Mapping[str, Sequence[str]],
    batch_size: int = 256,
) -> tuple[list[str], np.ndarray]:
    """Zero-shot classification: each class embedding is the renormalised mean of its prompts'
    embeddings (CLIP's prompt ensembling, Radford et al. 2021); probabilities are the softmax of
    the model's logit_scale times cosine similarity.  Returns (labels, probs[N, C]) with columns
    in ``class_prompts`` order."""
    if not class_prompts:
        raise ValueError("zero_shot: class_prompts is empty")
    names = list(class_prompts)
    class_emb = []
    for name in names:
        prompts = class_prompts[name]
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"zero_shot: class {name!r} needs a non-empty list of prompts")
        e = encode_texts(clip, list(prompts)).mean(axis=0)
        class_emb.append(e / max(float(np.linalg.norm(e)), 1e-12))
    cls = np.stack(class_emb)
    img = encode_images(clip, images, batch_size=batch_size)
    scale = float(clip.model.logit_scale.exp().clamp(max=100).item()) \
        if hasattr(clip.model, "logit_scale") else 100.0
    logits = scale * img @ cls.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = [names[i] for i in probs.argmax(axis=1)] if len(img) else []
    return labels, probs.astype(np.float32)
