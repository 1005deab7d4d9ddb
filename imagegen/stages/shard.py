"""Shard stage: bit-reproducible WebDataset tars in img2dataset's folder layout.

The same samples, config and library versions always give byte-identical shards, so a shard's
sha256 can name it and a rerun can be checked against the first run.  Three things make that
hold: the sample order comes from a keyed hash (not from how the caller happened to list the
keys, nor from a numpy stream that may change between releases); every tar header field that
would carry the machine, user or clock is fixed; and nothing we write holds a timestamp.

Layout per shard, as img2dataset's webdataset writer leaves it (``img2dataset/writer.py`` and
``img2dataset/logger.py:write_stats``): ``00000.tar`` with members ``<key>.<jpg|png>``,
``<key>.txt``, ``<key>.json`` per sample; ``00000.parquet`` with one row per sample;
``00000_stats.json`` with the counters img2dataset's logger reads.  Every file is written to
``.<name>.tmp-<pid>`` and renamed into place, so a reader never sees half a shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from imagegen.artifacts import write_json_atomic
from imagegen.hashing import file_sha256

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "png", "npy")  # npy: a latent (numpy array file) of a latent dataset
# First bytes of each format (JPEG SOI + marker prefix; PNG signature, RFC 2083 section 12.11).
_MAGIC = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n", "npy": b"\x93NUMPY"}
# webdataset splits a member name at the first dot of its basename, treats "__x__" names as its
# own metadata and "/" as folders, so keys must avoid all three.
_BAD_KEY_CHARS = re.compile(r"[./\\\s\x00-\x1f\x7f]")
_TAR_FORMAT = tarfile.PAX_FORMAT
_TAR_ENCODING = "utf-8"
_INT64 = (-(2**63), 2**63 - 1)


class Sample(TypedDict):
    """One sample as the shard stage takes it."""

    key: str
    image: bytes
    ext: Literal["jpg", "png"]
    caption: str
    meta: dict[str, Any]


class ShardConfig(BaseModel):
    """Options of the shard stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_shard_size: int = Field(
        1000, ge=1, le=10_000_000, description="Samples per shard (the last shard may hold fewer)")
    max_shard_bytes: int | None = Field(
        None, ge=10_240, description="Optional cap on a tar's size in bytes; a shard is closed "
        "early rather than exceed it (a single sample larger than the cap gets a shard of its own)")
    shuffle_seed: int = Field(0, ge=0, description="Seed of the key permutation done before sharding")
    image_ext: Literal["jpg", "png"] | None = Field(
        None, description="None: each sample keeps its own extension; set: every sample must "
        "have this extension (images are never re-encoded here)")
    name_prefix: str = Field(
        "", max_length=64, pattern=r"^[A-Za-z0-9_-]*$",
        description="Prefix of shard file names; empty gives img2dataset's 00000.tar")


class ShardInfo(BaseModel):
    """What one written shard holds: enough to list it in a card and to verify it later."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Tar file name inside the output folder, e.g. 00000.tar")
    count: int = Field(ge=1, description="Samples in the shard")
    bytes: int = Field(ge=0, description="Tar size in bytes")
    sha256: str = Field(description="sha256 of the tar file")


# ----------------------------------------------------------------------------------------------
# planning


def check_key(key: Any, where: str = "") -> str:
    """Refuse keys that webdataset would split, hide or put in a folder."""
    loc = f" ({where})" if where else ""
    if not isinstance(key, str):
        raise TypeError(f"sample key must be str, got {type(key).__name__}: {key!r}{loc}")
    if not key:
        raise ValueError(f"sample key is empty{loc}")
    if _BAD_KEY_CHARS.search(key):
        raise ValueError(
            f"sample key {key!r}{loc} contains '.', '/', '\\', whitespace or a control character; "
            "webdataset splits member names at the first dot, so keys must not contain these")
    if key.startswith("__"):
        raise ValueError(f"sample key {key!r}{loc} starts with '__', which webdataset reserves")
    return key


def _order_digest(seed: int, key: str) -> bytes:
    # A keyed hash gives a permutation that depends only on (seed, key set): stable across numpy
    # releases, platforms and the order in which the caller lists the keys.
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16, key=seed.to_bytes(8, "little")).digest()


def plan_shards(keys: Iterable[str], cfg: ShardConfig | None = None) -> list[list[str]]:
    """Seeded permutation of ``keys``, cut into shards of ``cfg.target_shard_size``.

    Only keys are needed, so the shuffle of a large dataset never holds images in memory.
    """
    cfg = cfg or ShardConfig()
    keys = list(keys)
    seen: set[str] = set()
    dups: list[str] = []
    for i, key in enumerate(keys):
        check_key(key, f"position {i}")
        if key in seen:
            dups.append(key)
        seen.add(key)
    if dups:
        raise ValueError(f"{len(dups)} duplicate sample keys, e.g. {sorted(set(dups))[:5]}; keys must be unique")
    if not keys:
        raise ValueError("no samples to shard: the key list is empty")
    order = sorted(keys, key=lambda k: (_order_digest(cfg.shuffle_seed, k), k))
    n = cfg.target_shard_size
    return [order[i:i + n] for i in range(0, len(order), n)]


# ----------------------------------------------------------------------------------------------
# sample checks and encoding


def _jsonable(value: Any, path: str) -> Any:
    """A plain-JSON copy of ``value``: numpy values become Python ones, NaN/inf become null."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None  # JSON has no NaN; null is its "missing"
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), path)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"meta{path}: dict key {k!r} is {type(k).__name__}, JSON needs str")
            out[k] = _jsonable(v, f"{path}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"meta{path}: {type(value).__name__} value {value!r:.80} is not JSON-serialisable")


def _check_sample(sample: Any, key: str, cfg: ShardConfig, where: str) -> tuple[bytes, str, str, dict[str, Any]]:
    """Validate one sample; return (image, ext, caption, meta as plain JSON values)."""
    if not isinstance(sample, Mapping):
        raise TypeError(f"sample {key!r} ({where}): expected a dict, got {type(sample).__name__}")
    missing = [f for f in ("key", "image", "ext", "caption") if f not in sample]
    if missing:
        raise ValueError(f"sample {key!r} ({where}): missing field(s) {missing}")
    if sample["key"] != key:
        raise ValueError(f"get_sample({key!r}) returned a sample with key {sample['key']!r} ({where})")
    image = sample["image"]
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(f"sample {key!r} ({where}): image must be bytes, got {type(image).__name__}")
    image = bytes(image)
    ext = sample["ext"]
    if ext not in IMAGE_EXTS:
        raise ValueError(f"sample {key!r} ({where}): ext must be one of {IMAGE_EXTS}, got {ext!r}")
    if cfg.image_ext is not None and ext != cfg.image_ext:
        raise ValueError(f"sample {key!r} ({where}): ext is {ext!r} but the config asks for "
                         f"image_ext={cfg.image_ext!r}; the shard stage does not re-encode images")
    if not image.startswith(_MAGIC[ext]):
        raise ValueError(f"sample {key!r} ({where}): image bytes do not start with the {ext} "
                         f"signature (first bytes {image[:8]!r}); wrong ext or not an image")
    caption = sample["caption"]
    if not isinstance(caption, str):
        raise TypeError(f"sample {key!r} ({where}): caption must be str, got {type(caption).__name__}")
    meta = sample.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"sample {key!r} ({where}): meta must be a dict, got {type(meta).__name__}")
    try:
        meta = _jsonable(meta, "")
    except TypeError as exc:
        raise TypeError(f"sample {key!r} ({where}): {exc}") from None
    return image, ext, caption, meta


def _meta_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A member header with nothing from the machine, user or clock in it."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


Members = list[tuple[tarfile.TarInfo, bytes]]


def _members(key: str, image: bytes, ext: str, caption: str, meta: dict[str, Any]) -> Members:
    files = [(f"{key}.{ext}", image), (f"{key}.txt", caption.encode("utf-8")), (f"{key}.json", _meta_json(meta))]
    return [(_tarinfo(name, len(data)), data) for name, data in files]


def _member_bytes(members: Members) -> int:
    """Exact bytes these members add to the tar (headers, PAX records, padded data)."""
    total = 0
    for ti, data in members:
        total += len(ti.tobuf(_TAR_FORMAT, _TAR_ENCODING, "surrogateescape"))
        total += -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return total


def _closed_size(payload: int) -> int:
    # tarfile ends an archive with two zero blocks and pads it to a whole record.
    return -(-(payload + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


# ----------------------------------------------------------------------------------------------
# parquet


def _flatten(meta: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar meta fields, nested dicts as ``a.b``; lists stay only in the .json member."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        name = f"{prefix}{k}"
        if name in out:
            raise ValueError(f"meta field {name!r} appears twice once nested dicts are flattened to 'a.b' names")
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{name}."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[name] = v
    return out


def _column(values: list[Any]) -> pa.Array:
    """An arrow column whose type follows the values, so every shard types a field the same way."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.nulls(len(values), pa.null())
    if kinds == {bool}:
        return pa.array(values, pa.bool_())
    if kinds == {int} and all(_INT64[0] <= v <= _INT64[1] for v in values if v is not None):
        return pa.array(values, pa.int64())
    if kinds <= {int, float} and all(abs(v) < 2**53 for v in values if isinstance(v, int)):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    if kinds == {str}:
        return pa.array(values, pa.string())
    # mixed types: keep every value, as text (strings as they are, the rest as JSON)
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def _parquet_table(rows: list[tuple[str, str, dict[str, Any]]]) -> pa.Table:
    """key, caption, then the flattened meta fields (from :func:`_flatten`) in name order."""
    flat_rows = []
    for key, caption, flat in rows:
        row: dict[str, Any] = {}
        for name, value in flat.items():
            # a meta field repeating the sample's own key/caption is the same column; a differing
            # one (an older caption kept by a recaption step, say) is kept under "meta.<name>"
            if name in ("key", "caption"):
                if value == (key if name == "key" else caption):
                    continue
                name = f"meta.{name}"
            row[name] = value
        flat_rows.append(row)
    names = sorted({n for row in flat_rows for n in row})
    columns = {"key": pa.array([r[0] for r in rows], pa.string()),
               "caption": pa.array([r[1] for r in rows], pa.string())}
    for name in names:
        columns[name] = _column([row.get(name) for row in flat_rows])
    return pa.table(columns)


# ----------------------------------------------------------------------------------------------
# writing


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class _ShardWriter:
    """One tar being filled; closed into its final name atomically."""

    def __init__(self, out_dir: Path, name: str):
        self.path = out_dir / name
        self.tmp = _tmp_path(self.path)
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=_TAR_FORMAT, encoding=_TAR_ENCODING)
        self.payload = 0
        self.rows: list[tuple[str, str, dict[str, Any]]] = []

    def add(self, key: str, caption: str, flat_meta: dict[str, Any], members: Members, nbytes: int) -> None:
        for ti, data in members:
            self.tar.addfile(ti, io.BytesIO(data))
        self.payload += nbytes
        self.rows.append((key, caption, flat_meta))

    def close(self) -> ShardInfo:
        table = _parquet_table(self.rows)  # before the tar is renamed: a failure leaves nothing behind
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        stem = self.path.name[: -len(".tar")]
        pq_path = self.path.with_name(f"{stem}.parquet")
        pq_tmp = _tmp_path(pq_path)
        pq.write_table(table, pq_tmp)
        os.replace(pq_tmp, pq_path)
        n = len(self.rows)
        # The keys img2dataset's logger reads; times are fixed at 0 so the file is reproducible.
        stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": {"success": n}}
        write_json_atomic(self.path.with_name(f"{stem}_stats.json"), stats)
        return ShardInfo(name=self.path.name, count=n, bytes=self.path.stat().st_size,
                         sha256=file_sha256(self.path))

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _prepare_out_dir(out_dir: Path, prefix: str, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(prefix)}\d{{5,}}(?:\.tar|\.parquet|_stats\.json)$")
    old = sorted(p for p in out_dir.iterdir() if pattern.match(p.name))
    if old and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(old)} shard file(s) (e.g. {old[0].name}); writing into it "
            "would mix two runs. Use an empty folder or pass overwrite=True")
    for p in old:
        p.unlink()


def write_shards_from_plan(plan: list[list[str]], get_sample: Callable[[str], Sample], out_dir: str | Path,
                           cfg: ShardConfig | None = None, *, overwrite: bool = False) -> list[ShardInfo]:
    """Write the shards of ``plan`` (from :func:`plan_shards`), fetching each sample by key.

    Samples are written in plan order.  With ``cfg.max_shard_bytes`` a planned shard is split
    where it would grow past the cap, and numbering simply continues, so the result is still a
    function of (plan, samples, cfg) alone.
    """
    cfg = cfg or ShardConfig()
    out_dir = Path(out_dir)
    if not isinstance(plan, list) or not all(isinstance(chunk, list) for chunk in plan):
        raise TypeError("plan must be a list of lists of keys, as plan_shards returns")
    seen: set[str] = set()
    for s, chunk in enumerate(plan):
        if not chunk:
            raise ValueError(f"plan shard {s} is empty")
        for i, key in enumerate(chunk):
            check_key(key, f"plan shard {s}, position {i}")
            if key in seen:
                raise ValueError(f"key {key!r} appears twice in the plan (again in shard {s}, position {i})")
            seen.add(key)
    _prepare_out_dir(out_dir, cfg.name_prefix, overwrite)
    infos: list[ShardInfo] = []
    for s, chunk in enumerate(plan):
        infos += write_planned_shard(chunk, get_sample, out_dir, cfg,
                                     lambda j: f"{cfg.name_prefix}{len(infos) + j:05d}.tar", f"plan shard {s}")
    return infos


def write_planned_shard(chunk: list[str], get_sample: Callable[[str], Sample], out_dir: Path, cfg: ShardConfig,
                        name: Callable[[int], str], where: str) -> list[ShardInfo]:
    """Write one planned shard (its keys in order) as one tar, or several where ``cfg.max_shard_bytes``
    cuts it; ``name(j)`` names its j-th tar.  A tar's bytes never depend on its name, so the part-
    parallel writer (:mod:`imagegen.stages.shard_parts`) writes each planned shard on its own under
    provisional names and numbers the tars afterwards, byte for byte as one process would."""
    infos: list[ShardInfo] = []
    writer = _ShardWriter(out_dir, name(0))
    try:
        for i, key in enumerate(chunk):
            pos = f"{where}, position {i}"
            image, ext, caption, meta = _check_sample(get_sample(key), key, cfg, pos)
            try:
                flat = _flatten(meta)
            except ValueError as exc:
                raise ValueError(f"sample {key!r} ({pos}): {exc}") from None
            members = _members(key, image, ext, caption, meta)
            nbytes = _member_bytes(members)
            if cfg.max_shard_bytes is not None:
                if writer.rows and _closed_size(writer.payload + nbytes) > cfg.max_shard_bytes:
                    infos.append(writer.close())
                    writer = _ShardWriter(out_dir, name(len(infos)))
                if not writer.rows and _closed_size(nbytes) > cfg.max_shard_bytes:
                    log.warning("sample %r (%s) alone makes a %d-byte tar, over max_shard_bytes=%d; "
                                "it gets a shard of its own", key, pos, _closed_size(nbytes), cfg.max_shard_bytes)
            writer.add(key, caption, flat, members, nbytes)
        infos.append(writer.close())
    except BaseException:
        writer.abort()
        raise
    return infos


def shard_of_keys(plan: list[list[str]], infos: list[ShardInfo]) -> dict[str, str]:
    """Key -> the name of the tar that holds it, for shards written from ``plan``.

    ``max_shard_bytes`` may split a planned shard into several tars (numbering continues), so the
    planned index is not the tar's: the tars hold the plan's keys in plan order, ``count`` each."""
    order = (k for chunk in plan for k in chunk)
    out = {info.name: [next(order) for _ in range(info.count)] for info in infos}
    rest = sum(1 for _ in order)
    if rest or len(out) != len(infos):
        raise ValueError(f"the shards ({sum(i.count for i in infos)} samples) do not match the plan "
                         f"({sum(len(c) for c in plan)} keys)")
    return {k: name for name, keys in out.items() for k in keys}


def write_shards(samples: Iterable[Sample], out_dir: str | Path, cfg: ShardConfig | None = None,
                 *, overwrite: bool = False) -> list[ShardInfo]:
    """Shuffle and shard ``samples`` in one call.

    This holds every sample in memory; for large inputs call :func:`plan_shards` on the keys and
    :func:`write_shards_from_plan` with a function that loads one sample by key.
    """
    cfg = cfg or ShardConfig()
    by_key: dict[str, Sample] = {}
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or "key" not in sample:
            raise ValueError(f"sample at position {i} is not a dict with a 'key' field")
        key = check_key(sample["key"], f"position {i}")
        if key in by_key:
            raise ValueError(f"duplicate sample key {key!r} (again at position {i})")
        by_key[key] = sample
    return write_shards_from_plan(plan_shards(by_key, cfg), by_key.__getitem__, out_dir, cfg, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# bringing in img2dataset output


def read_img2dataset_folder(folder: str | Path) -> list[Path]:
    """The tar shards of an img2dataset (webdataset format) output folder, in name order.

    Each tar must have its ``.parquet`` next to it.  img2dataset writes ``_stats.json`` when a
    shard is finished, so a tar without one may be cut short: that is warned about, not refused.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"img2dataset folder {folder} does not exist or is not a folder")
    tars = sorted(p for p in folder.glob("*.tar") if not p.name.startswith(".") and p.is_file())
    if not tars:
        raise FileNotFoundError(f"no .tar shards in {folder}; was img2dataset run with output_format='webdataset'?")
    no_parquet = [p.name for p in tars if not p.with_suffix(".parquet").is_file()]
    if no_parquet:
        raise FileNotFoundError(f"{len(no_parquet)} shard(s) in {folder} have no .parquet next to them: "
                                f"{no_parquet[:10]}; the folder is incomplete or not img2dataset output")
    bad = [p.name for p in tars if p.stat().st_size == 0 or not tarfile.is_tarfile(p)]
    if bad:
        raise ValueError(f"{len(bad)} file(s) in {folder} are not readable tar archives: {bad[:10]}")
    no_stats = [p.name for p in tars if not p.with_name(f"{p.stem}_stats.json").is_file()]
    if no_stats:
        warnings.warn(f"{len(no_stats)} shard(s) in {folder} have no _stats.json, so img2dataset may not "
                      f"have finished them: {no_stats[:10]}", stacklevel=2)
    return tars
