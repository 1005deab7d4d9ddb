"""Training loader over WebDataset shards (webdataset 0.2.x), with exact epochs or resampling.

Two modes, because they answer different questions:

* exact epoch (``resampled=False``): each shard goes to one (rank, DataLoader worker), so over
  R ranks x W workers every sample is read exactly once.  That is what evaluation passes and
  dataset checks need.  Ranks get whole shards, so their sample counts differ a little: for DDP
  training use the resampled mode (or ``torch.distributed.algorithms.Join``).
* training (``resampled=True``): an endless stream of passes over the shards; each pass is a
  fresh permutation seeded by (seed, epoch, pass) split disjointly over ranks x workers, so
  ranks never read the same shard within a pass (``PartitionedPasses``).  ``with_epoch`` cuts
  the stream so each rank yields exactly ``epoch_samples`` samples per epoch, whatever the
  worker count.  With fewer shards than ranks x workers, shards are drawn with replacement
  instead (a warning says so).

A sample that cannot be used (image bytes PIL cannot decode, no caption, no image) is logged with
its key and shard and skipped; webdataset's default handler would instead stop the whole run on
the first bad file among millions.  Call ``dataset.set_epoch(e)`` before each epoch, as with
``DistributedSampler``, to get a new shard and sample order.

Aspect-ratio buckets (``buckets=``, as kohya-ss / OneTrainer train SD): a fixed set of (height,
width) sizes of about the same pixel count (:func:`aspect_buckets`); each image goes to the bucket
nearest its aspect ratio (in log ratio), is resized to cover it and center-cropped, and each
worker keeps one batch buffer per bucket, so every batch has one shape.  A bucket's partial batch
is flushed when the worker's stream ends (dropped with ``drop_last``), so an exact epoch still
reads every sample exactly once over ranks x workers, and the batches are a function of the seed.
Latent samples are grouped by their stored shape (never resized).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "npy")  # member extensions read as the image, first found wins
LATENT_KEY = "npy"  # a latent shard's sample: float32 [C, h, w] saved by numpy (never pickled)


def decode_latent(data: bytes) -> torch.Tensor:
    """A ``.npy`` member -> float32 [C, h, w] (``allow_pickle=False``: object arrays are refused)."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"a latent must be a float array [C, h, w], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32, copy=False).copy())
_EXIF_ORIENTATION = 0x0112


class BadSample(ValueError):
    """A sample that is skipped; the message names its key and shard."""


def log_and_continue(exn: BaseException) -> bool:
    """Default error handler: log a warning and go on (webdataset's handler convention)."""
    log.warning("skipped: %s", exn if isinstance(exn, BadSample) else repr(exn))
    return True


# ----------------------------------------------------------------------------------------------
# rank / worker / seeds


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit args, else an initialised torch.distributed group, else $RANK/$WORLD_SIZE, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"pass both rank and world_size or neither (got rank={rank}, world_size={world_size})")
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif "RANK" in os.environ or "WORLD_SIZE" in os.environ:
            try:
                rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
            except ValueError:
                raise ValueError(f"$RANK={os.environ.get('RANK')!r} / $WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                                 "are not integers") from None
        else:
            rank, world_size = 0, 1
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from its parts; independent of PYTHONHASHSEED, unlike ``hash()``."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _zero_worker_seed() -> int:
    # ResampledShards mixes this with its own seed; ours already names the rank and worker.
    return 0


def coverage_warning(n_shards: int, world_size: int, num_workers: int) -> str | None:
    """The warning text when some (rank, worker) pairs get no shard, else None."""
    readers = world_size * max(num_workers, 1)
    if n_shards >= readers:
        return None
    return (f"{n_shards} shards for {world_size} ranks x {max(num_workers, 1)} workers = {readers} readers: "
            f"{readers - n_shards} will get no shard and stay idle (every sample is still read once); "
            "write more, smaller shards to use them all")


# ----------------------------------------------------------------------------------------------
# decoding


def decode_rgb(data: bytes, image_size: int | None = None, buckets: Sequence[Bucket] | None = None) -> torch.Tensor:
    """Image bytes -> uint8 HWC RGB tensor, optionally resized and center-cropped.

    Resize: the shorter side becomes ``image_size`` (bicubic, antialiased by PIL), then the
    center square is kept; with ``buckets``, the image is fitted to the bucket nearest its aspect
    ratio instead (:func:`fit_to_bucket`).  EXIF orientation is applied when the file has one.
    """
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if buckets:
        img = fit_to_bucket(img, nearest_bucket(img.size[0], img.size[1], buckets))
    elif image_size is not None and img.size != (image_size, image_size):
        w, h = img.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    # np.array, not np.asarray: torch wants a writable buffer (and a per-call warnings filter
    # costs more than this small copy)
    return torch.from_numpy(np.array(img, dtype=np.uint8))


Bucket = tuple[int, int]  # (height, width)


def aspect_buckets(base: int, multiple: int = 8, max_ratio: float = 2.0) -> tuple[Bucket, ...]:
    """(height, width) buckets of about ``base`` x ``base`` pixels, sides multiples of ``multiple``,
    aspect ratios up to ``max_ratio``:1 either way, ordered from the tallest to the widest.

    As kohya-ss' bucket maker: for each width (a multiple), the largest multiple height whose area
    does not exceed base^2; the square ``base`` x ``base`` is always one of them.
    """
    if not isinstance(base, int) or not isinstance(multiple, int) or multiple < 1 or base < multiple or base % multiple:
        raise ValueError(f"aspect_buckets: base ({base!r}) must be a positive multiple of multiple ({multiple!r})")
    if not (isinstance(max_ratio, (int, float)) and 1.0 <= max_ratio <= 8.0):
        raise ValueError(f"aspect_buckets: max_ratio must lie in [1, 8], got {max_ratio!r}")
    area = base * base
    out = set()
    for w in range(multiple, base * base // multiple + 1, multiple):
        h = area // w // multiple * multiple
        if h < multiple:
            break
        if max(h / w, w / h) <= max_ratio + 1e-9:
            out.add((h, w))
    out.add((base, base))
    return tuple(sorted(out, key=lambda b: (b[1] / b[0], b)))


def check_buckets(buckets: Sequence[Bucket]) -> tuple[Bucket, ...]:
    out = tuple((int(h), int(w)) for h, w in buckets)
    if not out or any(h < 1 or w < 1 for h, w in out) or len(set(out)) != len(out):
        raise ValueError(f"buckets must be distinct (height, width) pairs of positive ints, got {list(buckets)}")
    return out


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest ``width / height`` in log ratio (ties: the first)."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - r))


def fit_to_bucket(img: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize ``img`` (bicubic) so it covers ``bucket`` = (height, width), then keep the centre."""
    bh, bw = bucket
    w, h = img.size
    if (w, h) == (bw, bh):
        return img
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def to_unit_range(rgb: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1]; written into ``out`` (a [3, H, W] view) when given.

    x / 127.5 - 1 maps 0 -> -1 and 255 -> 1 exactly in float32.
    """
    chw = rgb.permute(2, 0, 1)
    if out is None:
        out = torch.empty(chw.shape, dtype=torch.float32)
    out.copy_(chw)
    return out.div_(127.5).sub_(1.0)


def decode_image(data: bytes, image_size: int | None = None) -> torch.Tensor:
    """Image bytes -> float32 CHW tensor in [-1, 1] (see :func:`decode_rgb`)."""
    return to_unit_range(decode_rgb(data, image_size))


def _decode_samples(src: Iterator[dict[str, Any]], image_size: int | None, with_meta: bool,
                    handler: Callable[[BaseException], bool],
                    buckets: Sequence[Bucket] | None = None) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples -> {"image" (uint8 HWC), "caption", "key"[, "meta"]}; bad ones go to ``handler``.

    Images stay uint8 here: converting to float per sample and then again copying into the
    batch costs more than the JPEG decode at small sizes, so the batch is filled in one pass.
    """
    for raw in src:
        key, shard = raw.get("__key__"), raw.get("__url__")
        try:
            image_key = next((k for k in IMAGE_KEYS if k in raw), None)
            if image_key is None:
                members = sorted(k for k in raw if not k.startswith("__"))
                raise BadSample(f"sample {key!r} in shard {shard}: no image member (has {members})")
            if "txt" not in raw:
                raise BadSample(f"sample {key!r} in shard {shard}: no caption (.txt member)")
            try:
                caption = raw["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadSample(f"sample {key!r} in shard {shard}: caption is not UTF-8 ({exc})") from None
            try:
                # latents are used as stored: image_size is the pixel size, it does not resize them
                image = decode_latent(raw[image_key]) if image_key == LATENT_KEY else \
                    decode_rgb(raw[image_key], image_size, buckets)
            except Exception as exc:  # PIL raises many types for bad bytes
                raise BadSample(f"sample {key!r} in shard {shard}: cannot decode .{image_key} "
                                f"({type(exc).__name__}: {exc})") from None
            out: dict[str, Any] = {"image": image, "caption": caption, "key": key}
            if with_meta:
                try:
                    meta = json.loads(raw["json"]) if "json" in raw else {}
                except ValueError as exc:
                    raise BadSample(f"sample {key!r} in shard {shard}: .json is not valid JSON ({exc})") from None
                out["meta"] = meta
        except BadSample as exn:
            if handler(exn):
                continue
            return
        yield out


def _is_rgb8(image: torch.Tensor) -> bool:
    return image.dtype == torch.uint8 and image.dim() == 3 and image.shape[2] == 3


def _float_sample(sample: dict[str, Any]) -> dict[str, Any]:
    if _is_rgb8(sample["image"]):
        sample["image"] = to_unit_range(sample["image"])
    return sample


def _empty_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """In a DataLoader worker, allocate the batch in shared memory directly, as torch's own
    default_collate does, so sending it to the main process needs no extra copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)  # float32
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape, strides)


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples: images become one float32 [B, 3, H, W] tensor in [-1, 1]; captions, keys
    (and metas) stay lists.  Images may be float CHW tensors or uint8 HWC RGB tensors (what the
    dataset hands to :func:`make_loader`), converted here in one pass into the batch.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    images = [s["image"] for s in samples]
    shapes = {tuple(im.permute(2, 0, 1).shape) if _is_rgb8(im) else tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch have different shapes {sorted(shapes)}; "
                         "pass image_size= so every image is resized to the same square, or buckets= "
                         "so each batch comes from one aspect-ratio bucket")
    out = _empty_batch((len(images), *shapes.pop()))
    for i, im in enumerate(images):
        if _is_rgb8(im):
            to_unit_range(im, out=out[i])  # each image's conversion runs while its slice is in cache
        else:
            out[i].copy_(im)
    batch = {"image": out, "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}
    if "meta" in samples[0]:
        batch["meta"] = [s["meta"] for s in samples]
    return batch


def _as_tuple(sample: dict[str, Any]) -> tuple[Any, ...]:
    """(image, caption, key[, meta]) for a sample or a batch."""
    out = (sample["image"], sample["caption"], sample["key"])
    return out + (sample["meta"],) if "meta" in sample else out


def _batched(src: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    buf: list[dict[str, Any]] = []
    for sample in src:
        buf.append(sample)
        if len(buf) == batch_size:
            yield collate_samples(buf)
            buf = []
    if buf:
        yield collate_samples(buf)


def _shape_of(image: torch.Tensor) -> tuple[int, ...]:
    return tuple(image.permute(2, 0, 1).shape) if _is_rgb8(image) else tuple(image.shape)


def _bucketed(src: Iterator[dict[str, Any]], batch_size: int, drop_last: bool) -> Iterator[dict[str, Any]]:
    """Batches of one image shape each: one buffer per shape, a batch as soon as one fills; at the
    end of the stream the partial buffers in order of their first sample (or none: ``drop_last``)."""
    bufs: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for sample in src:
        buf = bufs.setdefault(_shape_of(sample["image"]), [])
        buf.append(sample)
        if len(buf) == batch_size:
            yield collate_samples(buf)
            buf.clear()
    if not drop_last:
        for buf in bufs.values():
            if buf:
                yield collate_samples(buf)


def _identity(batch: Any) -> Any:
    return batch


# ----------------------------------------------------------------------------------------------
# dataset


class PartitionedPasses(IterableDataset):
    """Shard source of the training mode: each iteration is one pass over a permutation of all
    shards seeded by (seed, epoch, pass number), of which this (rank, worker) reads the disjoint
    share ``order[rank::world_size][worker::num_workers]``.  Within a pass no shard is read by
    two readers; passes follow one another for as long as the epoch needs samples."""

    def __init__(self, shards: list[str], seed: int, epoch: int, rank: int, world_size: int, worker: int,
                 num_workers: int) -> None:
        super().__init__()
        self.shards, self.seed, self.epoch = shards, seed, epoch
        self.rank, self.world_size, self.worker, self.num_workers = rank, world_size, worker, num_workers
        self.passes = 0

    def share(self, pass_index: int) -> list[str]:
        order = list(self.shards)
        random.Random(derive_seed("pass", self.seed, self.epoch, pass_index)).shuffle(order)
        return order[self.rank::self.world_size][self.worker::self.num_workers]

    def __iter__(self) -> Iterator[dict[str, str]]:
        mine = self.share(self.passes)
        self.passes += 1
        for url in mine:
            yield {"url": url}


class ShardDataset(IterableDataset):
    """The dataset :func:`make_dataset` returns.

    It holds only plain settings (so it pickles into DataLoader workers); the webdataset
    pipeline is built inside ``__iter__``, where the worker id is known.
    """

    def __init__(self, shards: list[str], *, batch_size: int | None, image_size: int | None, resampled: bool,
                 epoch_samples: int | None, shuffle_buffer: int, seed: int, rank: int, world_size: int,
                 with_meta: bool, as_tuple: bool, handler: Callable[[BaseException], bool],
                 buckets: tuple[Bucket, ...] | None = None, drop_last: bool = False):
        super().__init__()
        self.shards = shards
        self.buckets = buckets
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.image_size = image_size
        self.resampled = resampled
        self.epoch_samples = epoch_samples
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.with_meta = with_meta
        self.as_tuple = as_tuple
        self.handler = handler
        self.epoch = 0
        # make_loader sets this: samples keep uint8 HWC images and its collate converts them
        self.raw_images = False

    def set_epoch(self, epoch: int) -> None:
        """Shard order, sample shuffle and resampling draws all follow (seed, epoch)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def shards_for(self, worker: int, num_workers: int) -> list[str]:
        """Exact-epoch mode: the shards this rank's ``worker`` reads this epoch."""
        order = list(self.shards)
        if self.shuffle_buffer > 1:  # same permutation on every rank: seeded by (seed, epoch) only
            random.Random(derive_seed("shards", self.seed, self.epoch)).shuffle(order)
        return order[self.rank::self.world_size][worker::num_workers]

    def _raw_samples(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]] | None:
        if self.resampled:
            ds = wds.WebDataset(self.shards, resampled=True, shardshuffle=False, handler=self.handler,
                                nodesplitter=None, workersplitter=None, empty_check=False)
            if not isinstance(ds.pipeline[0], wds.shardlists.ResampledShards):
                raise RuntimeError("unexpected webdataset pipeline layout; this loader supports webdataset 0.2.x")
            if len(self.shards) >= self.world_size * num_workers:
                # Partitioned passes: every repetition of the stream is one pass over a fresh
                # permutation of all shards, split disjointly over (rank, worker).
                ds.pipeline[0] = PartitionedPasses(self.shards, self.seed, self.epoch, self.rank, self.world_size,
                                                   worker, num_workers)
            else:
                # Too few shards to give every reader its own: draw with replacement (the stock
                # sampler seeds from the clock, so it is replaced by a seeded one).  One repetition
                # draws len(shards) shards.
                if worker == 0:
                    log.warning("%d shard(s) for %d rank(s) x %d worker(s): readers draw shards with replacement, "
                                "so samples may repeat across ranks within an epoch", len(self.shards),
                                self.world_size, num_workers)
                ds.pipeline[0] = wds.shardlists.ResampledShards(
                    self.shards, nshards=len(self.shards), deterministic=True, worker_seed=_zero_worker_seed,
                    seed=derive_seed("resample", self.seed, self.epoch, self.rank, worker) % (2**31))
            # with_epoch (below) repeats the stream to fill the epoch, and stops if a repetition
            # yields nothing (all shards unreadable) instead of spinning forever.
            return ds
        mine = self.shards_for(worker, num_workers)
        if not mine:
            log.warning("rank %d worker %d/%d has no shard to read (%d shards for %d ranks x %d workers)",
                        self.rank, worker, num_workers, len(self.shards), self.world_size, num_workers)
            return None
        return wds.WebDataset(mine, shardshuffle=False, handler=self.handler, nodesplitter=None,
                              workersplitter=None, empty_check=False)

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = _worker()
        raw = self._raw_samples(worker, num_workers)
        if raw is None:
            return iter(())
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed("samples", self.seed, self.epoch, self.rank, worker))
            raw = raw.compose(wds.filters.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        pipe = raw.compose(lambda src: _decode_samples(src, self.image_size, self.with_meta, self.handler,
                                                       self.buckets))
        if self.resampled:
            # with_epoch counts per iterator, i.e. per worker: split the rank's quota over workers
            assert self.epoch_samples is not None
            share = self.epoch_samples // num_workers + (worker < self.epoch_samples % num_workers)
            if share == 0:  # with_epoch(0) would mean "no limit"
                return iter(())
            pipe = pipe.with_epoch(share)
        out: Iterator[Any] = iter(pipe)
        if self.batch_size is not None and self.buckets is not None:
            out = _bucketed(out, self.batch_size, self.drop_last)
        elif self.batch_size is not None:
            out = _batched(out, self.batch_size)
        elif not self.raw_images:
            out = map(_float_sample, out)
        return map(_as_tuple, out) if self.as_tuple else out


def _check_shards(shards: Sequence[str | Path]) -> list[str]:
    if isinstance(shards, (str, Path)):
        raise TypeError("shards must be a list of paths/URLs, not a single string; wrap it in a list")
    out = [str(s) for s in shards]
    if not out:
        raise ValueError("no shards given")
    missing = [s for s in out if "://" not in s and not s.startswith("pipe:") and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard file(s) not found, e.g. {missing[:5]}")
    return out


def _make(shards: Sequence[str | Path], *, batch_size: int | None, image_size: int | None, resampled: bool,
          epoch_samples: int | None, shuffle_buffer: int, seed: int, rank: int | None, world_size: int | None,
          with_meta: bool, as_tuple: bool, handler: Callable[[BaseException], bool] | None,
          buckets: Sequence[Bucket] | None = None, drop_last: bool = False) -> ShardDataset:
    paths = _check_shards(shards)
    if buckets is not None:
        buckets = check_buckets(buckets)
        if image_size is not None:
            raise ValueError("pass image_size= (square crops) or buckets= (aspect-ratio buckets), not both")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be an int >= 1 or None, got {image_size!r}")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be an int >= 0 (0 or 1: no shuffling), got {shuffle_buffer!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if resampled:
        if not isinstance(epoch_samples, int) or epoch_samples < 1:
            raise ValueError(f"resampled=True needs epoch_samples (samples per rank per epoch) as an int >= 1, "
                             f"got {epoch_samples!r}")
    elif epoch_samples is not None:
        raise ValueError("epoch_samples only applies with resampled=True; an exact epoch reads every sample once")
    rank, world_size = resolve_rank(rank, world_size)
    return ShardDataset(paths, batch_size=batch_size, image_size=image_size, resampled=resampled,
                        epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank,
                        world_size=world_size, with_meta=with_meta, as_tuple=as_tuple,
                        handler=handler or log_and_continue, buckets=buckets, drop_last=drop_last)


def make_dataset(shards: Sequence[str | Path], *, batch_size: int | None = None, image_size: int | None = None,
                 resampled: bool = False, epoch_samples: int | None = None, shuffle_buffer: int = 1000,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, with_meta: bool = False,
                 handler: Callable[[BaseException], bool] | None = None, as_tuple: bool = False,
                 buckets: Sequence[Bucket] | None = None, drop_last: bool = False) -> ShardDataset:
    """An IterableDataset over ``shards`` yielding ``{"image", "caption", "key"[, "meta"]}``.

    ``image`` is float32 [3, H, W] in [-1, 1].  With ``batch_size`` it yields collated batches
    (see :func:`collate_samples`); with ``buckets`` (instead of ``image_size``) each batch comes
    from one aspect-ratio bucket and ``drop_last`` drops each bucket's partial batch at the end;
    with ``as_tuple`` tuples ``(image, caption, key[, meta])``.
    ``handler(exc) -> bool`` sees unreadable shards and bad samples: True skips, False stops
    this worker's stream; the default logs a warning and skips.
    """
    ds = _make(shards, batch_size=batch_size, image_size=image_size, resampled=resampled,
               epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank,
               world_size=world_size, with_meta=with_meta, as_tuple=as_tuple, handler=handler, buckets=buckets,
               drop_last=drop_last)
    if not resampled and (msg := coverage_warning(len(ds.shards), ds.world_size, 1)):
        warnings.warn(msg, stacklevel=2)
    return ds


def make_loader(shards: Sequence[str | Path], *, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                pin_memory: bool = False, persistent_workers: bool = False, prefetch_factor: int | None = None,
                **dataset_kwargs: Any) -> DataLoader:
    """A DataLoader over :func:`make_dataset` that batches with :func:`collate_samples`.

    Each worker batches its own stream, so the last batch of each worker may be short (unless
    ``drop_last``, which in exact-epoch mode drops samples).  ``dataset_kwargs`` go to
    :func:`make_dataset`; with ``buckets`` the dataset batches per bucket (one shape a batch;
    ``drop_last`` drops each bucket's partial batch per worker).  Call
    ``loader.dataset.set_epoch(e)`` before each epoch; with
    ``persistent_workers=True`` the workers keep the epoch they started with, so leave it off
    when the order should change between epochs.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if dataset_kwargs.pop("as_tuple", False):
        raise ValueError("make_loader yields dict batches; as_tuple= only applies to make_dataset")
    defaults = dict(image_size=None, resampled=False, epoch_samples=None, shuffle_buffer=1000, seed=0, rank=None,
                    world_size=None, with_meta=False, handler=None, buckets=None)
    unknown = set(dataset_kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"make_loader got unknown argument(s) {sorted(unknown)}")
    bucketed = dataset_kwargs.get("buckets") is not None
    # buckets: each worker batches its own stream per bucket (the DataLoader only passes batches on)
    ds = _make(shards, batch_size=batch_size if bucketed else None, as_tuple=False, drop_last=drop_last,
               **{**defaults, **dataset_kwargs})
    ds.raw_images = True
    if not ds.resampled and (msg := coverage_warning(len(ds.shards), ds.world_size, num_workers)):
        warnings.warn(msg, stacklevel=2)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    # Its own generator: each new iterator draws a base seed, which would otherwise come from the
    # global CPU generator (saved in checkpoints) a different number of times in a resumed process.
    # Sample order never depends on it (worker seeds are fixed by the dataset).
    if bucketed:
        return DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=_identity, pin_memory=pin_memory,
                          generator=torch.Generator().manual_seed(0), **extra)
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples,
                      drop_last=drop_last, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
                      **extra)
