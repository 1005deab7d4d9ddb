"""Fréchet distance (FID / FD-<extractor>) and KID on image features, with clean-fid features.

* FID (Heusel et al. 2017): ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussians
  fitted to 2048-d Inception pool features.  The trace of the matrix square root is computed
  from the eigenvalues of ``sqrt(S1) S2 sqrt(S1)`` (symmetric PSD, same spectrum as ``S1 S2``)
  in float64: no ``scipy.linalg.sqrtm`` (SciPy 1.18 removed the ``disp`` argument clean-fid
  passes), no complex round-off.
* KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``, averaged over
  random subsets, as clean-fid's ``kernel_distance`` defines it.
* Features come from clean-fid (Parmar et al. 2022): its resize modes and its Inception, or a
  custom extractor through the same data path (clean-fid's custom feature-extractor hook); a
  distance on non-Inception features is reported as ``FD-<name>``, never as FID.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imagegen.artifacts import write_json_atomic
from imagegen.evaluate.images import list_images
from imagegen.hashing import file_sha256, stable_hash

MODES: tuple[str, ...] = ("clean", "legacy_pytorch", "legacy_tensorflow")
INCEPTION_ID = "inception"

# Where clean-fid 0.1.35 looks for its Inception weights (cleanfid/features.py feature_extractor,
# cleanfid/downloads_helper.py, cleanfid/inception_pytorch.py).  No environment variable moves them.
INCEPTION_TORCHSCRIPT_NAME = "inception-2015-12-05.pt"
INCEPTION_TORCHSCRIPT_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
INCEPTION_PYTORCH_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
_MIN_WEIGHTS_BYTES = 1 << 20  # the real files are ~92-95 MB; anything under 1 MB is a broken download


class SmallSampleWarning(UserWarning):
    """Fewer samples than feature dimensions (singular covariance), or a capped KID subset."""


class InceptionWeightsMissingError(FileNotFoundError):
    """clean-fid's Inception weights are not where clean-fid looks, and could not be fetched."""


# --------------------------------------------------------------------------------- the math


def _vector(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D mean vector, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or inf entries")
    return a


def _square(name: str, x: Any, d: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.shape != (d, d):
        raise ValueError(f"{name} must be a ({d}, {d}) covariance to match the means, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or inf entries")
    scale = max(float(np.abs(a).max()), 1e-300)
    if float(np.abs(a - a.T).max()) > 1e-6 * scale:
        raise ValueError(f"{name} is not symmetric (max |S - S^T| = {np.abs(a - a.T).max():.3g})")
    return (a + a.T) / 2


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric matrix, negative eigenvalues (round-off) clipped to 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((S1 S2)^(1/2))`` via the eigenvalues of ``sqrt(S1) S2 sqrt(S1)`` (symmetric PSD)."""
    r = _psd_sqrt(sigma1)
    m = r @ sigma2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Round-off can make the distance of a set to itself a tiny negative number; it is clipped
    to 0 (the true value is never negative).
    """
    m1 = _vector("mu1", mu1)
    m2 = _vector("mu2", mu2)
    if m1.shape != m2.shape:
        raise ValueError(f"mu1 and mu2 differ in length: {m1.shape[0]} vs {m2.shape[0]}")
    d = m1.shape[0]
    s1 = _square("sigma1", sigma1, d)
    s2 = _square("sigma2", sigma2, d)
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(fd, 0.0)


def _features(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, dims) array, got shape {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 samples of >= 1 dims, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
        raise ValueError(f"{name} has NaN or inf values (first in row {bad})")
    return a


def gaussian_stats(features: Any, *, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof=1, as clean-fid's ``np.cov``) of ``(n, d)`` features, float64.

    Warns (SmallSampleWarning) when ``n <= d``: the covariance is then singular.
    """
    f = _features(name, features)
    n, d = f.shape
    if n <= d:
        warnings.warn(
            f"{name}: {n} samples of {d}-d features give a singular covariance (rank <= {n - 1}); "
            f"at least {d + 1} samples are needed for a nonsingular one, and the Fréchet distance "
            f"is biased upward at small n (it falls as n grows; compare only equal n, and use "
            f"thousands of samples, e.g. 10k-50k for 2048-d Inception features)",
            SmallSampleWarning,
            stacklevel=2,
        )
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(d, d)


def fd_from_features(feats1: Any, feats2: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    mu1, s1 = gaussian_stats(feats1, name="feats1")
    mu2, s2 = gaussian_stats(feats2, name="feats2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feats1 and feats2 differ in dimension: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance(mu1, s1, mu2, s2)


def kid(
    feats1: Any, feats2: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std over subsets) of the unbiased MMD^2 estimate.

    Kernel ``k(x, y) = (x.y / d + 1)^3``; each subset draws ``m`` rows of each set without
    replacement (seeded), ``MMD^2_u = [sum_{i!=j} k(x_i,x_j) + k(y_i,y_j)] / (m(m-1))
    - 2 sum_{i,j} k(x_i,y_j) / m^2`` (Binkowski et al. 2018; clean-fid's kernel_distance).
    The std is the population std (ddof=0) of the subset estimates.
    """
    x_all = _features("feats1", feats1)
    y_all = _features("feats2", feats2)
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"feats1 and feats2 differ in dimension: {x_all.shape[1]} vs {y_all.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    n1, n2, d = x_all.shape[0], y_all.shape[0], x_all.shape[1]
    m = min(n1, n2, subset_size)
    if m < subset_size:
        warnings.warn(
            f"kid: subset_size {subset_size} capped at {m} (feats1 has {n1} samples, feats2 {n2})",
            SmallSampleWarning,
            stacklevel=2,
        )
    rng = np.random.default_rng(seed)
    est = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        x = x_all[rng.choice(n1, m, replace=False)]
        y = y_all[rng.choice(n2, m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        est[s] = within - 2.0 * kxy.sum() / (m * m)
    return float(est.mean()), float(est.std())


def stats_hash(mu: Any, sigma: Any) -> str:
    """sha256 of the little-endian float64 bytes of ``mu`` then ``sigma`` (provenance id)."""
    m = np.ascontiguousarray(np.asarray(mu, dtype="<f8"))
    s = np.ascontiguousarray(np.asarray(sigma, dtype="<f8"))
    return hashlib.sha256(m.tobytes() + s.tobytes()).hexdigest()


def metric_name(extractor_id: str) -> str:
    """``"FID"`` for clean-fid's Inception, ``"FD-<extractor>"`` for anything else."""
    return "FID" if extractor_id == INCEPTION_ID else f"FD-{extractor_id}"


# ------------------------------------------------------------------------- Inception weights


SHA256_ENV = "IMAGEGEN_INCEPTION_SHA256"


class InceptionWeightsUntrustedError(PermissionError):
    """The Inception file is not safetensors (loading it runs code) and its sha256 is not the
    expected one, or no expected sha256 is known for it."""


def data_root_inception_dir() -> Path:
    """``<data root>/models/inception/``: where this project keeps (and first looks for) the
    Inception TorchScript, instead of clean-fid's world-writable ``/tmp``."""
    from imagegen.paths import data_root

    return data_root() / "models" / "inception"


def inception_weights(mode: str) -> tuple[Path, str]:
    """``(path, url)`` of the Inception file for ``mode``: for the TorchScript modes the copy
    under the data root (:func:`data_root_inception_dir`) when there is one, else clean-fid's own
    place (``/tmp``); for legacy_pytorch torch.hub's checkpoints folder."""
    if mode in ("clean", "legacy_tensorflow"):
        mine = data_root_inception_dir() / INCEPTION_TORCHSCRIPT_NAME
        if mine.is_file():
            return mine, INCEPTION_TORCHSCRIPT_URL
        folder = Path("./" if platform.system() == "Windows" else "/tmp")
        return folder / INCEPTION_TORCHSCRIPT_NAME, INCEPTION_TORCHSCRIPT_URL
    if mode == "legacy_pytorch":
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        return folder / os.path.basename(INCEPTION_PYTORCH_URL), INCEPTION_PYTORCH_URL
    raise ValueError(f"unknown clean-fid mode {mode!r}; choose from {list(MODES)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download(url: str, dest: Path, timeout: float) -> None:
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while block := resp.read(1 << 20):
                out.write(block)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_inception_weights(mode: str, *, download: bool = True, timeout: float = 60.0) -> Path:
    """The Inception weights file clean-fid will load for ``mode``; fetched if missing and allowed.

    Offline (``download=False`` or ``HF_HUB_OFFLINE=1``, the project's offline switch) a missing
    file raises InceptionWeightsMissingError at once, naming the file, the URL and where to put
    it.  Call it before any other work: clean-fid itself would only fail deep inside a run.
    """
    path, url = inception_weights(mode)
    how = (f"Download {url} on a machine with internet and copy it to {path} (clean-fid looks "
           f"only there for mode {mode!r}; no environment variable moves it"
           + ("; the folder is torch.hub.get_dir()/checkpoints, set TORCH_HOME to move it)"
              if mode == "legacy_pytorch" else ")"))
    if path.is_file():
        size = path.stat().st_size
        if size < _MIN_WEIGHTS_BYTES:
            raise InceptionWeightsMissingError(
                f"Inception weights {path} are only {size} bytes (a broken download?). {how}")
        verify_inception_weights(path)
        return path
    reason = ("download=False" if not download else "HF_HUB_OFFLINE is set") if (not download or _offline()) else None
    if reason is None:
        try:
            if mode != "legacy_pytorch":  # downloaded under the data root, never into /tmp
                path = data_root_inception_dir() / INCEPTION_TORCHSCRIPT_NAME
            _download(url, path, timeout)
            if mode != "legacy_pytorch":  # pin what came over HTTPS from the official URL
                path.with_name(path.name + ".sha256").write_text(file_sha256(path) + "\n")
            verify_inception_weights(path)
            return path
        except Exception as exc:  # network down, proxy, disk full...
            reason = f"downloading it failed: {type(exc).__name__}: {exc}"
    raise InceptionWeightsMissingError(
        f"Inception weights for clean-fid mode {mode!r} are missing: {path} does not exist "
        f"({reason}). {how}.")


def expected_inception_sha256(path: Path) -> str | None:
    """The sha256 ``path`` must have: ``$IMAGEGEN_INCEPTION_SHA256``, else the pin file
    ``<file>.sha256`` written next to a copy this project downloaded under the data root, else
    for pytorch-fid's file the sha256 prefix in its published name (torch.hub's convention,
    ``...-6726825d.pth``, checked as a prefix).  None: nothing is known to check against."""
    env = os.environ.get(SHA256_ENV, "").strip().lower()
    if env:
        return env
    pin = path.with_name(path.name + ".sha256")
    if path.parent == data_root_inception_dir() and pin.is_file():
        return pin.read_text().strip().lower()
    m = re.search(r"-([0-9a-f]{8,})\.pth$", path.name)
    return m.group(1) if m else None


def verify_inception_weights(path: Path) -> str:
    """Refuse a pickle/TorchScript Inception file (loading one runs code) unless its sha256 is
    the expected one (:func:`expected_inception_sha256`); returns the sha256."""
    digest = file_sha256(path)
    want = expected_inception_sha256(path)
    pin_how = (f"check the file against a trusted copy (sha256sum {path}) and pin it with "
               f"{SHA256_ENV}=<sha256>, or put the file you trust at "
               f"{data_root_inception_dir() / path.name} with its sha256 in {path.name}.sha256 next to it")
    if want is None:
        raise InceptionWeightsUntrustedError(
            f"Inception weights {path} are TorchScript/pickle (loading runs code) and no expected sha256 "
            f"is known for them (its sha256 is {digest}); {pin_how}")
    if not digest.startswith(want) or len(want) < 8:
        raise InceptionWeightsUntrustedError(
            f"Inception weights {path} have sha256 {digest}, expected {want}: refusing to load them "
            f"(a replaced or damaged file); {pin_how}")
    return digest


# ------------------------------------------------------------------------- feature extraction


class ShortestSideCrop:
    """clean-fid ``custom_fn_resize``: HxWx3 uint8 -> uint8 resized (shortest side, PIL bicubic)
    and centre-cropped to ``size`` x ``size``: open_clip's val transform before ToTensor."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        im = Image.fromarray(np.asarray(x, dtype=np.uint8))
        w, h = im.size
        s = self.size
        if (w, h) != (s, s):
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            im = im.crop((left, top, left + s, top + s))
        return np.asarray(im, dtype=np.uint8)


def _auto_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def clean_fid_features(
    folder: str | Path | Sequence[str | Path],
    mode: str = "clean",
    model: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    *,
    download: bool = True,
) -> np.ndarray:
    """Features of every image in ``folder`` (recursive, sorted) through clean-fid's data path.

    ``model=None``: clean-fid's Inception for ``mode`` (``build_feature_extractor``); the weights
    are checked first (InceptionWeightsMissingError before anything else runs).  Otherwise
    ``model`` is a custom extractor (clean-fid's custom feature-extractor hook): a callable taking a
    ``[B, 3, H, W]`` float tensor in ``[0, 255]`` on ``device`` and returning ``[B, D]`` features.
    If it has an ``input_size`` attribute, images are resized to it as open_clip does
    (ShortestSideCrop) instead of by ``mode``'s 299x299 resizer.  A list of files may be given
    instead of a folder.  ``num_workers=None``: CPUs - 1, at most 8.
    """
    import cleanfid.fid as cfid
    from cleanfid.features import build_feature_extractor

    if mode not in MODES:
        raise ValueError(f"unknown clean-fid mode {mode!r}; choose from {list(MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    if model is None:
        check_inception_weights(mode, download=download)
    elif not callable(model):
        raise TypeError(f"model must be a callable feature extractor, got {type(model).__name__}")
    input_size = getattr(model, "input_size", None) if model is not None else None
    # Without a resize to a fixed size the batches can only be stacked if all images agree.
    needs_one_size = input_size is None and mode == "legacy_tensorflow"
    if isinstance(folder, (str, Path)):
        files = list_images(folder, recursive=True, same_size=needs_one_size)
    else:
        files = [Path(f) for f in folder]
        if not files:
            raise ValueError("clean_fid_features: the list of image files is empty")
    if model is None:
        weights = check_inception_weights(mode, download=download)  # verified just before loading
        if mode == "legacy_pytorch":
            model = build_feature_extractor(mode, device=dev, use_dataparallel=False)
        else:  # clean-fid's own extractor, loaded from the verified file wherever it is
            from cleanfid.inception_torchscript import InceptionV3W

            net = InceptionV3W(str(weights.parent), download=False,
                               resize_inside=mode == "legacy_tensorflow").to(dev).eval()
            model = net.__call__
    fn_resize = ShortestSideCrop(int(input_size)) if input_size is not None else None
    feats = cfid.get_files_features(
        [str(f) for f in files], model, num_workers=_auto_workers() if num_workers is None else num_workers,
        batch_size=batch_size, device=dev, mode=mode, custom_fn_resize=fn_resize, verbose=False,
    )
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] != len(files):
        raise RuntimeError(f"feature extractor returned shape {feats.shape} for {len(files)} images; "
                           f"expected ({len(files)}, D)")
    return feats


SFID_ID = "inception_spatial"
SFID_CHANNELS = 7  # Nash et al. 2021 / ADM's evaluator: the first 7 channels of mixed_6/conv (17 x 17)


class InceptionSpatial(torch.nn.Module):
    """sFID's features (Nash et al. 2021, "Generating images with sparse representations"; computed
    as ADM's evaluator does): the TF Inception's ``mixed_6/conv`` output, a 17 x 17 map, first 7
    channels, flattened in (height, width, channel) order as TensorFlow lays it out: 2023-d.

    ``base`` is the TorchScript Inception clean-fid loads (StyleGAN's port of the 2015-12-05 TF
    graph), whose ``layers`` keep the TF node names: the trunk ``conv`` ... ``mixed_5`` is run in
    order, then ``mixed_6.conv``.  Input: ``[B, 3, H, W]`` in [0, 255]; resized to 299 x 299
    (bilinear, as the TorchScript's own resize) unless already there, then (x - 128) / 128."""

    def __init__(self, base: Any) -> None:
        super().__init__()
        layers = getattr(base, "layers", None)
        children = dict(layers.named_children()) if layers is not None else {}
        names = list(children)
        mixed6 = children.get("mixed_6")
        conv = dict(mixed6.named_children()).get("conv") if mixed6 is not None else None
        if conv is None:
            raise ValueError("sFID needs the TF Inception's layers.mixed_6.conv (StyleGAN's inception-2015-12-05 "
                             f"TorchScript, the file clean-fid loads); this file's layers are {names[:20]}")
        self.trunk = torch.nn.ModuleList([children[n] for n in names[:names.index("mixed_6")]])
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if tuple(x.shape[2:]) != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        for m in self.trunk:
            x = m(x)
        x = self.conv(x)[:, :SFID_CHANNELS]
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def inception_spatial_extractor(mode: str = "clean", device: str | torch.device = "cpu", *,
                                download: bool = True) -> InceptionSpatial:
    """The sFID extractor from the same Inception file FID uses (found, sha256-checked and loaded
    as :func:`clean_fid_features` does); TorchScript modes only (``clean``, ``legacy_tensorflow``)."""
    if mode not in ("clean", "legacy_tensorflow"):
        raise ValueError(f"sFID uses the TF Inception's TorchScript port (fid_mode 'clean' or 'legacy_tensorflow'), "
                         f"not {mode!r} (pytorch-fid's network has other layers)")
    weights = check_inception_weights(mode, download=download)
    base = torch.jit.load(str(weights), map_location="cpu").eval()
    return InceptionSpatial(base).to(torch.device(device)).eval()


class ClipImageExtractor(torch.nn.Module):
    """A CLIP image tower as a clean-fid custom extractor: ``[B,3,H,W]`` in 0..255 -> embeddings.

    Preprocessing is the model's own (open_clip preprocess config): shortest side resized to the
    input size (bicubic, antialiased) and centre-cropped, scaled to 0..1, normalised with the
    model's mean/std.  ``normalize=False`` returns the raw ``encode_image`` output, as
    clean-fid's own CLIP extractor does; ``True`` L2-normalises it.
    """

    def __init__(self, clip: Any, normalize: bool = False) -> None:
        import open_clip

        super().__init__()
        self.clip_model = clip.model
        cfg = open_clip.get_model_preprocess_cfg(clip.model)
        size = cfg.get("size", clip.image_size)
        size = size if isinstance(size, int) else size[0]
        self.input_size = int(size)
        mean = cfg.get("mean", open_clip.constants.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.constants.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(clip.device))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(clip.device))
        self.normalize = bool(normalize)
        self.identity = dict(clip.identity)
        self.spec = str(clip.spec)
        weights = str(self.identity.get("weights_sha256", ""))[:12]
        self.extractor_id = _clip_extractor_name(clip.spec, weights, self.normalize)
        self.name = metric_name(self.extractor_id)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ClipImageExtractor takes [B, 3, H, W] images in 0..255, got shape {tuple(x.shape)}")
        x = x.to(self.mean.device, torch.float32)
        s = self.input_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top:top + s, left:left + s].clamp(0, 255)
        x = (x / 255.0 - self.mean) / self.std
        z = self.clip_model.encode_image(x).float()
        return F.normalize(z, dim=-1) if self.normalize else z


def _clip_extractor_name(spec: Any, weights_sha: str, normalize: bool) -> str:
    if spec.kind == "pretrained":
        base = f"CLIP-{spec.model_name}-{spec.tag}"
    elif spec.kind == "hf-hub":
        base = f"CLIP-{str(spec.repo).replace('/', '-')}"
    elif spec.kind == "checkpoint":
        base = f"CLIP-{spec.model_name}-{weights_sha}"
    else:
        base = f"CLIP-{Path(str(spec.path)).name}-{weights_sha}"
    return base + ("-l2" if normalize else "")


def clip_image_extractor(clip_spec: Any, device: str | torch.device = "cpu", *,
                         normalize: bool = False) -> ClipImageExtractor:
    """A CLIP image tower (loaded by ``imagegen.clip.load_clip``) as a custom FD extractor.

    The distance on its features is ``FD-<extractor_id>`` (``.name``), never "FID".
    """
    from imagegen.clip import load_clip

    return ClipImageExtractor(load_clip(clip_spec, device), normalize=normalize).eval()


# ---------------------------------------------------------------------- reference statistics


def _folder_dataset_id(root: Path | None, files: list[Path]) -> str:
    """A content id for a plain folder: relative names and sizes of its images."""
    entries = [((f.relative_to(root).as_posix() if root else str(f)), f.stat().st_size) for f in files]
    return "files-" + stable_hash(entries)


def _load_cached(npz: Path, meta_path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    if not (npz.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    with np.load(npz, allow_pickle=False) as z:
        mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
    if stats_hash(mu, sigma) != meta.get("stats_sha256"):
        raise ValueError(f"cached reference statistics {npz} do not match the hash in {meta_path}; "
                         f"delete both files to recompute them")
    return mu, sigma, meta


def reference_stats(
    images_or_folder: str | Path | Sequence[str | Path],
    extractor_id: str | None,
    mode: str,
    n: int | None,
    cache_dir: str | Path,
    *,
    dataset_id: str | None = None,
    model: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Reference ``(mu, sigma, meta)``, computed once and cached as ``<key>.npz`` + ``<key>.json``.

    The key hashes (dataset id, extractor id, mode, n, subset seed).  ``n=None`` uses every
    image; a smaller ``n`` takes a seeded random subset.  ``dataset_id`` should be the registry
    id; without it a folder is named by its file names and sizes.  ``model=None`` means clean-fid's
    Inception (``extractor_id`` "inception" or None); a custom ``model`` needs its own id
    (None: ``model.extractor_id``).  Arrays are stored without pickle and read with
    ``allow_pickle=False``; ``meta["stats_sha256"]`` is ``stats_hash(mu, sigma)``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown clean-fid mode {mode!r}; choose from {list(MODES)}")
    if model is None:
        extractor_id = extractor_id or INCEPTION_ID
        if extractor_id != INCEPTION_ID:
            raise ValueError(f"extractor_id {extractor_id!r} names a custom extractor but no model was given")
    else:
        extractor_id = extractor_id or getattr(model, "extractor_id", None)
        if not extractor_id:
            raise ValueError("a custom model needs an extractor_id (or a model.extractor_id attribute)")
        if extractor_id == INCEPTION_ID:
            raise ValueError(f"extractor_id {INCEPTION_ID!r} is reserved for clean-fid's Inception; "
                             f"name the custom extractor (its distance is reported as FD-<name>)")
    if n is not None and n < 2:
        raise ValueError(f"n must be >= 2 (or None for all images), got {n}")
    root = Path(images_or_folder) if isinstance(images_or_folder, (str, Path)) else None
    cache = Path(cache_dir)

    def key_for(ds: str) -> str:
        return stable_hash({"dataset": ds, "extractor": extractor_id, "mode": mode, "n": n,
                            "subset_seed": seed if n is not None else None})

    if dataset_id is not None:  # a known id: a cache hit needs no look at the images
        hit = _load_cached(cache / f"{key_for(dataset_id)}.npz", cache / f"{key_for(dataset_id)}.json")
        if hit is not None:
            return hit[0], hit[1], {**hit[2], "cached": True}
    if model is None:
        check_inception_weights(mode, download=download)  # before listing thousands of files
    all_files = (list_images(root, recursive=True) if root is not None
                 else [Path(f) for f in images_or_folder])
    if not all_files:
        raise ValueError("reference_stats: the list of image files is empty")
    available = len(all_files)
    if n is not None and n > available:
        raise ValueError(f"reference_stats: n={n} but only {available} images are available")
    files = all_files
    if n is not None and n < available:
        idx = np.sort(np.random.default_rng(seed).choice(available, n, replace=False))
        files = [all_files[i] for i in idx]
    dataset_id = dataset_id or _folder_dataset_id(root, all_files)
    key = key_for(dataset_id)
    npz, meta_path = cache / f"{key}.npz", cache / f"{key}.json"
    hit = _load_cached(npz, meta_path)
    if hit is not None:
        return hit[0], hit[1], {**hit[2], "cached": True}
    t0 = time.perf_counter()
    feats = clean_fid_features(files, mode=mode, model=model, batch_size=batch_size,
                               num_workers=num_workers, device=device, download=download)
    mu, sigma = gaussian_stats(feats, name=f"reference features of {dataset_id}")
    meta: dict[str, Any] = {
        "key": key,
        "dataset_id": dataset_id,
        "extractor_id": extractor_id,
        "metric": metric_name(extractor_id),
        "mode": mode,
        "n": n,
        "n_used": len(files),
        "n_available": available,
        "subset_seed": seed if n is not None else None,
        "feature_dim": int(mu.shape[0]),
        "stats_sha256": stats_hash(mu, sigma),
        "files_sha256": stable_hash([str(f.relative_to(root)) if root else str(f) for f in files], 64),
        "clean_fid_version": importlib.metadata.version("clean-fid"),
        "torch_version": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 3),
        "created_unix": round(time.time(), 3),
    }
    if model is None:
        weights, url = inception_weights(mode)
        meta["extractor_weights"] = {"file": str(weights), "url": url, "sha256": file_sha256(weights)}
    elif getattr(model, "identity", None):
        meta["extractor_weights"] = dict(model.identity)  # type: ignore[union-attr]
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{key}.", suffix=".npz.part")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, mu=mu, sigma=sigma)
        os.replace(tmp, npz)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_json_atomic(meta_path, meta)  # written last: its presence marks the entry complete
    return mu, sigma, {**meta, "cached": False}
