"""Download stage: img2dataset fetches the bytes, then one decode step makes every image uniform.

img2dataset (the real one) does the network part: thread pools per process, retries, timeouts,
its multiprocessing / pyspark / ray distributors.  We ask it for the raw bytes
(``disable_all_reencoding``) because its OpenCV decoder ignores EXIF orientation, silently
drops alpha onto black and cannot tell us *why* an image was bad; our own decode
(:func:`normalize_image`) applies EXIF orientation, converts CMYK / grayscale / alpha / 16-bit
images to 8-bit RGB and resizes with PIL (bicubic, antialiased), recording every decision.

Every input row appears in the ledger exactly once with ``status`` in
{"success", "failed", "skipped"} and a ``reason``; rows that failed for a transient reason
(timeout, 5xx, truncated body, connection error) are retried in further passes, and only those.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.executors import StageRunner, map_step
from imagegen.hashing import bytes_sha256, file_sha256, stable_hash
from imagegen.retry_after import rate_limited, wait_before_retry
from imagegen.stages.ledger import LedgerWriter

log = logging.getLogger(__name__)

LEDGER_COLUMNS = [
    "row_id", "url", "caption", "status", "reason", "error", "attempts", "key",
    "original_width", "original_height", "original_mode", "original_format", "exif_transposed",
    "width", "height", "source_sha256", "sha256",
]


class DownloadConfig(BaseModel):
    """Options of the download stage.  Network options go to img2dataset unchanged."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(64, ge=8, le=8192, description="Output side in pixels")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = Field(
        "center_crop", description="center_crop: square crop; border: pad to square; keep_ratio: "
        "shorter side = image_size; no: keep the original size")
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality")
    processes_count: int = Field(2, ge=1, le=512, description="img2dataset processes (and decode workers)")
    thread_count: int = Field(32, ge=1, le=4096, description="img2dataset download threads per process")
    timeout: float = Field(5.0, gt=0, le=600, description="Per-request timeout in seconds")
    retries: int = Field(0, ge=0, le=10, description="img2dataset's immediate retries per URL")
    retry_passes: int = Field(1, ge=0, le=5, description="Extra passes over rows that failed transiently")
    distributor: Literal["multiprocessing", "pyspark", "ray"] = Field(
        "multiprocessing", description="img2dataset's distributor of its download subjobs: multiprocessing "
        "(processes_count processes here), ray (a local Ray with processes_count CPUs, or the cluster at "
        "distributor_address), pyspark (Spark local[processes_count], or the master at distributor_address; needs "
        "Java). An execution knob, never part of an id: every distributor fetches the same parts")
    distributor_address: str | None = Field(
        None, description="The cluster img2dataset's distributor runs on: for ray 'auto' (the cluster this "
        "machine joined with `ray start`), HOST:PORT or ray://HOST:PORT; for pyspark spark://HOST:PORT or local[N]. "
        "None: a local one. Its workers write img2dataset's parts under the data root (a shared filesystem)")
    number_sample_per_shard: int = Field(10_000, ge=10, le=1_000_000)
    user_agent_token: str | None = Field(None, description="Identifies your crawler to site owners")
    url_col: str = "url"
    caption_col: str = "caption"
    max_pixels: int = Field(
        50_000_000, ge=1, le=2_000_000_000, description="refuse images with more pixels (width x height "
        "from the header, before decoding) as image_too_large: a 20 KB PNG can claim 13300 x 13300 "
        "and cost ~860 MB to decode")
    allow_private_addresses: bool = Field(
        False, description="fetch URLs whose host is a loopback, private, link-local or reserved IP "
        "literal or localhost (refused by default as skipped:private_address; the embedded world's own "
        "loopback server is always allowed)")
    retry_wait: float = Field(
        1.0, ge=0, le=600, description="seconds to wait before a retry pass that retries HTTP 429/503s "
        "when no server sends a usable Retry-After (img2dataset does not hand headers over: the retry "
        "pass probes one URL per host with HEAD, imagegen/retry_after.py)")
    retry_after_max: float = Field(
        60.0, ge=0, le=3600, description="cap on the wait a server's Retry-After asks for before a retry pass")
    on_duplicate_urls: Literal["error", "skip"] = Field(
        "error", description="error: refuse the list; skip: fetch the first, ledger the others as skipped")
    parent: str | None = Field(None, description="A new version of this registered dataset (NAME, NAME@N or id): "
                               "reuse its download, fetch only its rows that failed for a transient reason and "
                               "the rows of append_list")
    append_list: str | None = Field(None, description="With parent: a URL list whose rows are added (row ids "
                                    "continue after the parent's)")
    runner: StageRunner = None

    @model_validator(mode="after")
    def _distributor_address(self) -> "DownloadConfig":
        from imagegen.executors import distributor_address_problem

        problem = distributor_address_problem(self.distributor, self.distributor_address)
        if problem:
            raise ValueError(problem)
        return self


# ---------------------------------------------------------------------------- input validation

class InputError(ValueError):
    """The URL list cannot be used; the message says what is wrong and where."""


URL_BATCH_ROWS = 16_384
_URL_START = re.compile(r"^https?://[^\s/]+")  # a valid URL starts so (matched at its start)


def url_hashes(urls: pd.Series | np.ndarray | list[str]) -> np.ndarray:
    """64-bit hashes of URLs (compact: 8 bytes a row).  Equal hashes only make two URLs candidates:
    every hit is confirmed on the URLs themselves, so a collision never makes a row a duplicate."""
    return pd.util.hash_pandas_object(pd.Series(urls, dtype=object).astype(str), index=False).to_numpy(
        dtype=np.uint64)


def _list_format(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix not in (".parquet", ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".jsonl", ".json"):
        raise InputError(f"URL list {path}: unknown format {suffix!r} (use .parquet, .csv, .tsv or .jsonl)")
    return suffix


def _raw_batches(path: Path, suffix: str, columns: list[str], batch_rows: int) -> Iterator[pd.DataFrame]:
    """The list's rows, ``batch_rows`` at a time, as read before (parquet through pyarrow; CSV, TSV and
    JSONL through pandas' own readers in chunks, so every value parses as it did when the list was read
    whole).  The first item is the column names (a list), then the frames."""
    if suffix == ".parquet":
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        yield names
        want = [c for c in columns if c in names]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=want):
            yield batch.to_pandas()
    elif suffix in (".csv", ".csv.gz", ".tsv", ".tsv.gz"):
        sep = "\t" if suffix.startswith(".tsv") else ","
        names = list(pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, nrows=0).columns)
        yield names
        with pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, chunksize=batch_rows,
                         usecols=lambda c: c in columns) as reader:
            yield from reader
    elif suffix == ".jsonl":
        first = None
        with pd.read_json(path, lines=True, dtype=False, chunksize=batch_rows) as reader:
            for chunk in reader:
                if first is None:
                    first = list(chunk.columns)
                    yield first
                yield chunk
        if first is None:
            yield []
    else:  # one JSON document: read whole (there is no row to stop at inside it)
        df = pd.read_json(path, dtype=False)
        yield list(df.columns)
        yield df


def iter_url_list(path: str | Path, url_col: str = "url", caption_col: str = "caption",
                  batch_rows: int = URL_BATCH_ROWS) -> Iterator[pd.DataFrame]:
    """The URL list's rows in batches of row_id (position in the file), url (stripped), caption and
    ``skip_reason`` (``invalid_url`` or None; duplicates are found by :func:`scan_url_list`).  Raises
    :class:`InputError` naming the path (and the line of a bad JSONL file) for an unreadable list,
    missing columns (with a hint) or an empty list.  Memory: one batch."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"URL list {path} does not exist")
    suffix = _list_format(path)
    n = 0
    try:
        batches = _raw_batches(path, suffix, [url_col, caption_col], batch_rows)
        names = next(batches)
        missing = [c for c in (url_col, caption_col) if c not in names]
        if missing:
            hint = ""
            for want in missing:
                close = [c for c in names if c.lower() in {want.lower(), *_ALIASES.get(want, ())}]
                if close:
                    hint += (f"; column {close[0]!r} looks like {want!r}: pass "
                             f"--{'url' if want == url_col else 'caption'}-col {close[0]}")
            raise InputError(f"URL list {path} has no column(s) {missing}; it has {list(names)}{hint}")
        for df in batches:
            if not len(df):
                continue
            if url_col not in df.columns or caption_col not in df.columns:  # a JSONL chunk without the key
                df = df.reindex(columns=[url_col, caption_col])
            # str.strip and a regex match per value, as pandas' ``.str.strip()`` / ``.str.match`` do, without
            # the ``.str`` accessor: pandas caches it on its Series (Series -> accessor -> Series), a reference
            # cycle that kept each batch's strings until a full garbage collection (about 190 bytes a row of
            # every batch read, in the driver)
            url = np.array([u.strip() for u in df[url_col].astype(str).to_numpy()], dtype=object)
            good_url = np.fromiter((_URL_START.match(u) is not None for u in url), dtype=bool, count=len(url))
            out = pd.DataFrame({"row_id": np.arange(n, n + len(df), dtype=np.int64), "url": url,
                                "caption": df[caption_col].fillna("").astype(str).to_numpy()})
            out["skip_reason"] = None
            out.loc[~good_url, "skip_reason"] = "invalid_url"
            n += len(df)
            yield out
    except InputError:
        raise
    except Exception as exc:  # pyarrow/pandas raise many types for unreadable files
        where = _bad_jsonl_line(path) if suffix == ".jsonl" else None
        raise InputError(f"URL list {path} could not be read as {suffix}{where or ''}: {exc}") from exc
    if n == 0:
        raise InputError(f"URL list {path} is empty: nothing to download")


@dataclass
class UrlListScan:
    """What :func:`scan_url_list` found: the row count and the repeated URLs (row ids, numpy)."""
    rows: int
    dup_rows: np.ndarray       # row ids of the rows whose URL an earlier row has, ascending
    dup_of: np.ndarray         # the first row with that URL, for each of dup_rows


def scan_url_list(path: str | Path, url_col: str = "url", caption_col: str = "caption",
                  on_duplicate_urls: str = "error", batch_rows: int = URL_BATCH_ROWS) -> UrlListScan:
    """Validate the list without holding it: one pass in batches keeps a 64-bit hash and the row id of
    every valid URL (16 bytes a row kept; measured peak slope about 30 bytes a row between 20,000 and 80,000
    rows, with the sort); rows whose hash repeats are candidates, and a second pass (only
    when there are any) reads just those rows' URLs and compares the URLs themselves, so two different
    URLs with the same hash are both kept.  Raises :class:`InputError` for duplicates with
    ``on_duplicate_urls='error'`` (naming the rows)."""
    hashes, ids = [], []
    rows = 0
    for b in iter_url_list(path, url_col, caption_col, batch_rows):
        ok = b["skip_reason"].isna().to_numpy()
        hashes.append(url_hashes(b["url"].to_numpy()[ok]))
        ids.append(b["row_id"].to_numpy()[ok])
        rows += len(b)
    h = np.concatenate(hashes)
    rid = np.concatenate(ids)
    del hashes, ids
    order = np.argsort(h, kind="stable")
    hs = h[order]
    rep = np.zeros(len(hs), dtype=bool)
    if len(hs) > 1:
        same = hs[1:] == hs[:-1]
        rep[1:] |= same
        rep[:-1] |= same
    cand = np.sort(rid[order[rep]])
    del h, rid, order, hs, rep
    dup_rows = dup_of = np.zeros(0, dtype=np.int64)
    if len(cand):
        got_ids, got_urls = [], []
        for b in iter_url_list(path, url_col, caption_col, batch_rows):
            mine = np.isin(b["row_id"].to_numpy(), cand)
            got_ids.append(b["row_id"].to_numpy()[mine])
            got_urls.append(b["url"].to_numpy()[mine])
        c = pd.DataFrame({"row_id": np.concatenate(got_ids), "url": np.concatenate(got_urls)})
        first = c.groupby("url", sort=False)["row_id"].transform("min").to_numpy()
        dup = c["row_id"].to_numpy() != first
        dup_rows, dup_of = c["row_id"].to_numpy()[dup], first[dup]
    if len(dup_rows) and on_duplicate_urls == "error":
        examples = ", ".join(f"row {r} repeats row {f}" for r, f in zip(dup_rows[:5], dup_of[:5]))
        raise InputError(f"URL list {path} has {len(dup_rows)} duplicate URL(s) ({examples}); "
                         "deduplicate it, or fetch each URL once and ledger the repeats as skipped "
                         "with --set download.on_duplicate_urls=skip")
    return UrlListScan(rows, dup_rows, dup_of)


def iter_checked_url_list(path: str | Path, url_col: str = "url", caption_col: str = "caption",
                          on_duplicate_urls: str = "error",
                          batch_rows: int = URL_BATCH_ROWS) -> tuple[UrlListScan, Iterator[pd.DataFrame]]:
    """:func:`scan_url_list`, then the list's batches with ``skip_reason`` set for every repeated URL
    (``duplicate_url_of_row_N``)."""
    scan = scan_url_list(path, url_col, caption_col, on_duplicate_urls, batch_rows)

    def batches() -> Iterator[pd.DataFrame]:
        for b in iter_url_list(path, url_col, caption_col, batch_rows):
            a, e = np.searchsorted(scan.dup_rows, [b["row_id"].iloc[0], b["row_id"].iloc[-1] + 1])
            if e > a:
                at = scan.dup_rows[a:e] - int(b["row_id"].iloc[0])
                b.loc[at, "skip_reason"] = [f"duplicate_url_of_row_{f}" for f in scan.dup_of[a:e]]
            yield b
    return scan, batches()


def read_url_list(path: str | Path, url_col: str = "url", caption_col: str = "caption",
                  on_duplicate_urls: str = "error") -> pd.DataFrame:
    """Read and validate a LAION-style URL list (parquet, CSV, TSV or JSONL).

    Returns a frame with row_id (position in the file), url, caption, and ``skip_reason``
    (None, or why the row will not be fetched).  Raises :class:`InputError` before any work.
    Reads in batches (:func:`iter_checked_url_list`); a caller that only validates uses
    :func:`scan_url_list`, which never holds the rows.
    """
    _, batches = iter_checked_url_list(path, url_col, caption_col, on_duplicate_urls)
    return pd.concat(list(batches), ignore_index=True)


def _bad_jsonl_line(path: Path) -> str | None:
    """``", line N (text...)"`` for the first line of a JSONL file that is not a JSON object."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                return f", line {n} ({line.strip()[:80]!r} is not a JSON object)"
    return None


_ALIASES = {"url": ("image_url", "img_url", "link", "src", "uri"),
            "caption": ("text", "alt", "alt_text", "title", "txt", "description")}


# ---------------------------------------------------------------------------- decode / normalize

def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparency is composited over white, 16-bit is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    w, h = img.size
    if mode == "no":
        return img
    if mode == "border":
        s = size / max(w, h)
        inner = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=None)
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    if mode == "keep_ratio":
        return img
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _stable_message(exc: BaseException) -> str:
    """An exception's text without object addresses (PIL names ``<_io.BytesIO object at 0x...>``), so a
    ledger's error column is the same bytes in every run of the same request."""
    return re.sub(r" object at 0x[0-9a-fA-F]+>", " object>", str(exc))


def normalize_image(data: bytes, cfg: DownloadConfig) -> dict[str, Any]:
    """Decode raw bytes into the dataset's uniform encoding.

    Returns {"ok": True, "image": bytes, ...original properties} or {"ok": False, "reason":
    "empty_body" | "compressed_body" | "not_an_image" | "image_too_large" | "corrupt_image",
    "error": message}.  Sizes are checked on the header, before any pixel is decoded.
    """
    if not data:
        return {"ok": False, "reason": "empty_body", "error": "zero bytes received"}
    if data[:2] == b"\x1f\x8b":  # a gzip stream (Content-Encoding: gzip): never inflated here
        return {"ok": False, "reason": "compressed_body",
                "error": f"body is a gzip stream ({len(data)} bytes), not an image; it was not inflated"}
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return {"ok": False, "reason": "not_an_image", "error": "body is HTML/XML, not an image"}
    try:
        with warnings.catch_warnings():  # a size over PIL's bomb warning is reported, not printed
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            src = Image.open(io.BytesIO(data))
        with src:
            fmt, mode = src.format, src.mode
            if src.width * src.height > cfg.max_pixels:
                return {"ok": False, "reason": "image_too_large",
                        "error": f"{src.width}x{src.height} = {src.width * src.height:,} pixels > "
                                 f"download.max_pixels={cfg.max_pixels:,} (not decoded)"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src.load()
            orientation = src.getexif().get(0x0112, 1)
            upright = ImageOps.exif_transpose(src) if orientation not in (None, 1) else src
            rgb = _to_rgb(upright)
    except Image.UnidentifiedImageError as exc:
        # an image signature that does not decode is a corrupt image, anything else is not an image
        reason = "corrupt_image" if data.startswith(_IMAGE_MAGIC) or data[8:12] == b"WEBP" else "not_an_image"
        return {"ok": False, "reason": reason, "error": _stable_message(exc)}
    except Image.DecompressionBombError as exc:  # PIL's own limit, hit at open for > 2x MAX_IMAGE_PIXELS
        return {"ok": False, "reason": "image_too_large", "error": str(exc)}
    except (OSError, ValueError, SyntaxError) as exc:
        return {"ok": False, "reason": "corrupt_image", "error": f"{type(exc).__name__}: {_stable_message(exc)}"}
    # original size is reported upright (after EXIF), as a viewer shows it
    uw, uh = rgb.size
    out = _resize(rgb, cfg.image_size, cfg.resize_mode)
    buf = io.BytesIO()
    if cfg.encode_format == "jpg":
        out.save(buf, "JPEG", quality=cfg.encode_quality, optimize=False)
    elif cfg.encode_format == "png":
        out.save(buf, "PNG", compress_level=6)
    else:
        out.save(buf, "WEBP", quality=cfg.encode_quality)
    encoded = buf.getvalue()
    return {
        "ok": True, "image": encoded, "original_width": uw, "original_height": uh,
        "original_mode": mode, "original_format": fmt, "exif_transposed": orientation not in (None, 1),
        "width": out.width, "height": out.height, "sha256": bytes_sha256(encoded),
        "source_sha256": bytes_sha256(data),
    }


# ---------------------------------------------------------------------------- failure reasons

# ``subjob_failed``: img2dataset returned no record of the row (its subjob crashed); nothing is known
# against the URL, so the row is fetched again in the next pass
_TRANSIENT = {"timeout", "http_5xx", "truncated", "connection_error", "http_429", "subjob_failed"}
_LOST_ROW = "img2dataset returned no record for this row (subjob failed)"


def classify_error(message: str | None) -> str:
    """Map an img2dataset/urllib error message onto a short, countable reason."""
    m = (message or "").lower()
    if not m:
        return "unknown_error"
    if m == _LOST_ROW.lower():
        return "subjob_failed"
    if "infinite loop" in m or "redirect loop" in m or "too many redirects" in m:
        return "redirect_loop"
    if mo := re.search(r"http error (\d{3})", m):
        code = int(mo.group(1))
        if code == 429:
            return "http_429"
        return "http_5xx" if code >= 500 else f"http_{code}"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "incompleteread" in m or "incomplete read" in m or "bytes read" in m:
        return "truncated"
    if any(s in m for s in ("connection", "remote end closed", "reset by peer", "refused", "urlopen error")):
        return "connection_error"
    if "redirect" in m:
        return "redirect_loop"
    if "x-robots-tag" in m:
        return "disallowed_by_robots"
    return "download_error"


def is_transient(reason: str) -> bool:
    return reason in _TRANSIENT


# ---------------------------------------------------------------------------- img2dataset passes

@contextlib.contextmanager
def distributor_session(cfg: DownloadConfig) -> Iterator[dict[str, Any]]:
    """The engine of img2dataset's distributor for the passes of one download, as img2dataset
    expects it: ``ray`` finds an initialised Ray (``ray.init`` here: a local Ray with
    ``processes_count`` CPUs, or the cluster at ``distributor_address``), ``pyspark`` an active
    SparkSession (``local[processes_count]`` on loopback, or the master at ``distributor_address``).
    An engine that is already up (a Ray task runner, the user's SparkSession) is used and left running;
    one started here is stopped at the end.  Checked first (:func:`imagegen.executors.check_distributor`).
    Yields what ran the passes (recorded in the stage's counts, never in an id).
    """
    from imagegen.executors import check_distributor

    check_distributor(cfg.distributor, cfg.distributor_address)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before any worker starts: they inherit it
    if cfg.distributor == "ray":
        import ray

        from imagegen.executors import img2dataset_ray_retries  # its own ray distributor never retries

        def info(started: bool) -> dict[str, Any]:
            return {"kind": "ray", "ray": ray.__version__, "address": cfg.distributor_address, "started_here": started,
                    "cpus": int(ray.cluster_resources().get("CPU", 0)), "nodes": len(ray.nodes())}

        if ray.is_initialized():
            with img2dataset_ray_retries():
                yield info(False)
            return
        addr = cfg.distributor_address
        if addr:
            ray.init(address=addr, log_to_driver=False)
        else:
            ray.init(num_cpus=cfg.processes_count, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        try:
            with img2dataset_ray_retries():
                yield info(True)
        finally:
            ray.shutdown()
    elif cfg.distributor == "pyspark":
        import sys

        from pyspark.sql import SparkSession

        def info(spark: Any, started: bool) -> dict[str, Any]:
            sc = spark.sparkContext
            return {"kind": "pyspark", "pyspark": spark.version, "master": sc.master, "started_here": started,
                    "parallelism": int(sc.defaultParallelism)}

        active = SparkSession.getActiveSession()
        if active is not None:
            yield info(active, False)
            return
        master = cfg.distributor_address or f"local[{cfg.processes_count}]"
        # the Python workers must be this interpreter (img2dataset is installed here), on every machine
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        local = master.startswith("local")
        if local:  # servers listen on loopback (the JVM reads SPARK_LOCAL_IP when it starts)
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        b = (SparkSession.builder.master(master).appName("imagegen-download")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
             .config("spark.executorEnv.NO_ALBUMENTATIONS_UPDATE", "1"))
        if local:
            b = b.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        spark = b.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        try:
            yield info(spark, True)
        finally:
            spark.stop()
    else:
        yield {"kind": "multiprocessing", "processes": cfg.processes_count}


def _write_shards(batches: Iterator[pd.DataFrame], inp: Path, step: int) -> np.ndarray:
    """img2dataset's input for one pass: the rows of ``batches`` (row_id, url, caption) as
    ``inp/NNNNN.parquet``, ``step`` rows a file (img2dataset reads one input file whole, and numbers the
    shards of a folder's files on from each other: file i is shard i), never the whole list in one file.
    Returns the row ids written (compact), in order."""
    inp.mkdir(parents=True, exist_ok=True)
    buf: list[pd.DataFrame] = []
    n_buf = n_files = 0
    ids: list[np.ndarray] = []

    def flush(n: int) -> None:
        nonlocal buf, n_buf, n_files
        t = pd.concat(buf, ignore_index=True) if len(buf) > 1 else buf[0].reset_index(drop=True)
        t.iloc[:n].to_parquet(inp / f"{n_files:05d}.parquet", index=False)
        ids.append(t["row_id"].to_numpy(dtype=np.int64)[:n])
        n_files += 1
        rest = t.iloc[n:]
        buf, n_buf = ([rest] if len(rest) else []), len(rest)

    for b in batches:
        if not len(b):
            continue
        buf.append(b[["row_id", "url", "caption"]])
        n_buf += len(b)
        while n_buf >= step:
            flush(step)
    if n_buf:
        flush(n_buf)
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def _read_shards(inp: Path, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """A pass's input files (from :func:`_write_shards`), in order, one at a time."""
    for p in sorted(inp.glob("*.parquet")):
        yield pd.read_parquet(p, columns=columns)


def _img2dataset_pass(work: Path, pass_ids: np.ndarray, cfg: DownloadConfig, on_part: Any,
                      watch: bool = False) -> np.ndarray:
    """One img2dataset run over the input files in ``work/input`` (:func:`_write_shards`; ``pass_ids``:
    their row ids).

    img2dataset writes its own parts (``work/out/NNNNN.parquet``, one per input file, in input order)
    and streams to disk.  ``on_part(number, path, compact)`` is called once per part file with its
    compact columns (row_id, status, error_message; never the image bytes): with ``watch``, while
    img2dataset runs, from a :class:`_PartWatcher` thread for every part whose subjob has finished; after
    it, from this thread, for the parts not seen yet.  Returns the row ids img2dataset lost (no part
    holds them: a crashed subjob's part is absent), ascending.
    """
    # img2dataset imports albumentations, which phones home for updates at import in every
    # spawned worker; offline that costs seconds per process.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as i2d_download

    inp, out = work / "input", work / "out"
    seen: dict[int, np.ndarray] = {}

    def read_part(i: int, p: Path) -> None:  # compact columns only: the image bytes stay in the part files
        f = pd.read_parquet(p, columns=["row_id", "status", "error_message"])
        seen[i] = f["row_id"].to_numpy(dtype=np.int64)
        on_part(i, p, f)

    watcher = _PartWatcher(out, read_part) if watch else None
    try:
        with stdout_to_stderr():  # img2dataset's progress prints would break a caller's stdout (``--json``)
            if watcher is not None:
                watcher.start()
            i2d_download(
                url_list=str(inp), input_format="parquet", url_col="url", caption_col="caption",
                output_format="parquet", output_folder=str(out), save_additional_columns=["row_id"],
                disable_all_reencoding=True, encode_format="jpg", image_size=cfg.image_size,
                processes_count=cfg.processes_count, thread_count=cfg.thread_count,
                timeout=cfg.timeout, retries=cfg.retries, distributor=cfg.distributor,
                number_sample_per_shard=cfg.number_sample_per_shard, user_agent_token=cfg.user_agent_token,
                compute_hash="sha256", extract_exif=False, enable_wandb=False,
            )
    finally:
        if watcher is not None:
            watcher.finish()  # joined before anything else reads what it handed over (raises its error)
    for p in sorted(out.glob("*.parquet")):  # the parts the watcher did not see finish (or all, without one)
        if int(p.stem) not in seen:
            read_part(int(p.stem), p)
    got = np.concatenate(list(seen.values())) if seen else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(pass_ids, got)  # img2dataset lost rows (a crashed subjob): accounted for, never dropped


class _PartWatcher(threading.Thread):
    """Hands over each img2dataset part of ``out`` as soon as its subjob has finished it, while img2dataset
    runs on the main thread (it installs a SIGINT handler there, so it cannot move to a thread).

    A part is finished once ``NNNNN_stats.json`` exists: img2dataset's ``Downloader.download_shard`` closes
    the part's parquet writer (and its file) and only then calls ``logger.write_stats``, which writes that
    file (img2dataset 1.45: downloader.py, logger.py).  A subjob that crashes writes no stats, so its part
    is never handed over here (the pass accounts for it afterwards).  An error in ``on_part`` stops the
    watcher and is raised by :meth:`finish`."""

    POLL_S = 0.25

    def __init__(self, out: Path, on_part: Any) -> None:
        super().__init__(name=f"img2dataset-parts-{out.parent.name}", daemon=True)
        self.out, self.on_part = out, on_part
        self.seen: set[int] = set()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def sweep(self) -> None:
        if not self.out.is_dir():
            return
        for st in sorted(self.out.glob("*_stats.json")):
            name = st.name[:-len("_stats.json")]
            if not name.isdigit() or int(name) in self.seen:
                continue
            self.seen.add(int(name))
            self.on_part(int(name), self.out / f"{name}.parquet")

    def run(self) -> None:
        try:
            while not self.stop.wait(self.POLL_S):
                self.sweep()
        except BaseException as exc:  # raised on the main thread by finish()
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr for the block, in this process and every process it starts
    (img2dataset prints progress with ``print`` in its workers); restored afterwards."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable descriptor 1 or 2 (a detached process): nothing to protect
        yield
        return
    try:
        with contextlib.redirect_stdout(sys.stderr):  # a sys.stdout that is not descriptor 1
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _normalize_chunk(args: tuple[list[bytes], DownloadConfig]) -> list[dict[str, Any]]:
    blobs, cfg = args
    return [normalize_image(b, cfg) for b in blobs]


def _normalize_all(blobs: list[bytes], cfg: DownloadConfig) -> list[dict[str, Any]]:
    if cfg.processes_count <= 1 or len(blobs) < 256:
        return _normalize_chunk((blobs, cfg))
    n = min(cfg.processes_count, os.cpu_count() or 1)
    size = max(64, math.ceil(len(blobs) / (n * 4)))
    chunks = [(blobs[i:i + size], cfg) for i in range(0, len(blobs), size)]
    # Closed and joined, not terminated (the Pool context manager's exit): the workers leave on
    # their own.  Forked inside a Prefect flow process they inherit its SIGTERM handler, which
    # raises TerminationSignal, so a terminate() printed a Traceback per worker into the flow's
    # logs; they restore the default action too, for the terminate() after an error.
    pool = multiprocessing.get_context("fork").Pool(n, initializer=_default_sigterm)
    try:
        out = [r for part in pool.map(_normalize_chunk, chunks) for r in part]
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return out


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def is_private_host(url: str) -> bool:
    """True for URLs whose host is localhost or an IP literal that is not public (loopback,
    RFC 1918 private, link-local incl. cloud metadata 169.254.169.254, reserved, multicast).
    Host names are not resolved: a public name pointing at a private address is not caught."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not ip.is_global or ip.is_multicast
IMAGE_SCHEMA = pa.schema([("key", pa.string()), ("row_id", pa.int64()), ("image", pa.binary()),
                          ("ext", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
                          ("height", pa.int32()), ("caption", pa.string())])
_RESULT_FIELDS = ("original_width", "original_height", "original_mode", "original_format", "exif_transposed",
                  "width", "height", "sha256", "source_sha256")


@dataclass
class PartJob:
    """One download part to decode: the rows img2dataset fetched for it, in every pass."""
    index: int
    sources: list[tuple[str, list[int]]]   # (img2dataset part file, row_ids fetched there)
    captions: dict[int, str]
    cfg: DownloadConfig
    out_path: str
    result_path: str = ""                  # where the compact results (no image bytes) of its rows go
    inner_pool: bool = False               # decode with a pool of cfg.processes_count inside


RESULT_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("ok", pa.bool_()), ("reason", pa.string()), ("error", pa.string()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("original_mode", pa.string()),
    ("original_format", pa.string()), ("exif_transposed", pa.bool_()), ("width", pa.int64()),
    ("height", pa.int64()), ("sha256", pa.string()), ("source_sha256", pa.string())])


_DECODE_EXECUTION = {"processes_count", "thread_count", "distributor", "distributor_address", "runner", "timeout",
                     "retries",
                     "retry_passes", "retry_wait", "parent", "append_list"}  # not part of a decoded part


def _decode_key(job: PartJob) -> dict[str, Any]:
    cfg = {k: v for k, v in job.cfg.model_dump(mode="json").items() if k not in _DECODE_EXECUTION}
    return {"index": job.index, "sources": [(file_sha256(p), sorted(ids)) for p, ids in job.sources],
            "captions": stable_hash(sorted(job.captions.items()), 32), "cfg": cfg, "returns": "result_path"}


def _write_atomic(table: pa.Table, out: Path, **kw: Any) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, **kw)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@map_step("download-decode", key=_decode_key, outputs=lambda job: [job.out_path, job.result_path])
def decode_part(job: PartJob) -> str:
    """The map step of the download stage: decode one part's fetched bytes (never more than one
    part's images in memory), write ``images/part-NNNNN.parquet`` (rows by row_id) and the compact
    results (no image bytes) of its rows for the ledger to ``job.result_path``, each atomically;
    returns that path (a driver never holds every part's results)."""
    ids: list[int] = []
    blobs: list[bytes] = []
    for path, want in job.sources:
        t = pq.read_table(path, columns=["row_id", "jpg"])
        wanted = set(want)
        for rid, blob in zip(t.column("row_id").to_pylist(), t.column("jpg").to_pylist()):
            if rid in wanted:
                ids.append(int(rid))
                blobs.append(blob)
        del t
    order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
    ids = [ids[i] for i in order]
    blobs = [blobs[i] for i in order]
    results = _normalize_all(blobs, job.cfg) if job.inner_pool else _normalize_chunk((blobs, job.cfg))
    del blobs
    cols: dict[str, list[Any]] = {n: [] for n in IMAGE_SCHEMA.names}
    compact: dict[str, list[Any]] = {n: [] for n in ("row_id", "ok", "reason", "error", *_RESULT_FIELDS)}
    for rid, res in zip(ids, results):
        compact["row_id"].append(rid)
        compact["ok"].append(bool(res["ok"]))
        if res["ok"]:
            cols["key"].append(f"{rid:09d}")
            cols["row_id"].append(rid)
            cols["image"].append(res.pop("image"))
            cols["ext"].append(job.cfg.encode_format)
            cols["sha256"].append(res["sha256"])
            cols["width"].append(res["width"])
            cols["height"].append(res["height"])
            cols["caption"].append(job.captions[rid])
            compact["reason"].append(None)
            compact["error"].append(None)
            for k in _RESULT_FIELDS:
                compact[k].append(res[k])
        else:
            compact["reason"].append(res["reason"])
            compact["error"].append(res["error"])
            for k in _RESULT_FIELDS:
                compact[k].append(None)
    del results
    _write_atomic(pa.table(cols, schema=IMAGE_SCHEMA), Path(job.out_path), row_group_size=1000)
    del cols
    _write_atomic(pa.table(compact, schema=RESULT_SCHEMA), Path(job.result_path))
    return job.result_path


class _PartPlan:
    """The rows of one download, pass by pass, in compact numpy columns (attempts, a status code, the
    pass and img2dataset part of a row's last failure: its message stays in that part file, read back
    by the ledger a part at a time), and the image parts with where their rows were fetched.

    Image part k holds the rows of the first pass's img2dataset part k (its *home* rows), from whichever
    pass fetched each.  A part is ready to decode once each of its rows has its final outcome: fetched,
    failed for a reason that is not retried, or failed transiently in the last pass (a row img2dataset
    lost is only known once its pass ends).  With an executor (:meth:`start`), each ready part is
    submitted from the pass's part watcher while img2dataset still runs; :meth:`finish` submits the
    rest and returns every part's result path, in part order.  Without one, :meth:`jobs` are all the
    parts after the fetch.  Either way a part's job is the same (sources in pass, then part order)."""

    def __init__(self, row_ids: np.ndarray, first_pass_ids: np.ndarray, cfg: DownloadConfig, work: Path,
                 images_dir: Path, decoded_dir: Path) -> None:
        self.cfg, self.work, self.images_dir, self.decoded_dir = cfg, work, images_dir, decoded_dir
        self.step = max(1, cfg.number_sample_per_shard)
        self.position = pd.Index(row_ids)                      # row_id -> row position (row order)
        n_rows = len(row_ids)
        self.attempts = np.zeros(n_rows, dtype=np.int64)
        self.failed = np.zeros(n_rows, dtype=bool)             # failed in some pass
        self.fail_pass = np.full(n_rows, -1, dtype=np.int8)    # the pass of its last failure
        self.fail_part = np.full(n_rows, -1, dtype=np.int32)   # ... and its img2dataset part (-1: lost)
        # row position -> image part: the first-pass img2dataset part of its input row, known from the row's
        # place in that pass's input (also for a row img2dataset lost there and a retry pass fetched)
        self.home = np.full(n_rows, -1, dtype=np.int64)
        self.home[self.position.get_indexer(first_pass_ids)] = np.arange(len(first_pass_ids)) // self.step
        self.n = max(1, math.ceil(len(first_pass_ids) / self.step))
        self.sources: list[list[tuple[int, int, str, list[int]]]] = [[] for _ in range(self.n)]
        self.open_rows = np.bincount(self.home[self.home >= 0], minlength=self.n)[:self.n].astype(np.int64)
        self.ex: Any = None
        self.handles: dict[int, Any] = {}
        self.pass_counts: dict[int, dict[str, Any]] = {}

    def pass_dir(self, attempt: int) -> Path:
        return self.work / f"pass{attempt}"

    def part_file(self, attempt: int, part: int) -> Path:
        return self.pass_dir(attempt) / "out" / f"{part:05d}.parquet"

    # -------------------------------------------------------------- fetch outcomes

    def part_fetched(self, attempt: int, submit: bool) -> Any:
        """The ``on_part`` of pass ``attempt``: record the outcome of the part's rows and where the fetched
        ones are; with ``submit``, submit every image part that is now complete."""
        last = attempt == self.cfg.retry_passes
        counts = self.pass_counts.setdefault(attempt, {"rows": 0, "success": 0, "retry": {}, "limited": {}})

        def on_part(part: int, path: Path, compact: pd.DataFrame) -> None:
            ok = (compact["status"] == "success").to_numpy()
            ids = compact["row_id"].to_numpy(dtype=np.int64)
            pos = self.position.get_indexer(ids)
            self.attempts[pos] += 1
            bad_pos, bad_ids = pos[~ok], ids[~ok]
            self.failed[bad_pos] = True
            self.fail_pass[bad_pos] = attempt
            self.fail_part[bad_pos] = part
            msgs = compact["error_message"].to_numpy()[~ok].tolist()
            transient = np.array([is_transient(classify_error(m)) for m in msgs], dtype=bool)
            counts["rows"] += len(ids)
            counts["success"] += int(ok.sum())
            counts["retry"][part] = bad_ids[transient]
            counts["limited"][part] = bad_ids[transient & np.asarray(rate_limited(msgs), dtype=bool)] \
                if len(msgs) else bad_ids[:0]
            self._add_sources(attempt, part, path, ids[ok])
            final = ok.copy()
            final[~ok] = True if last else ~transient
            k = self.home[pos[final]]
            self.open_rows -= np.bincount(k[k >= 0], minlength=self.n)[:self.n]
            if submit and self.ex is not None:
                for kk in np.flatnonzero(self.open_rows == 0).tolist():
                    if kk not in self.handles:
                        self._submit(kk)
        return on_part

    def lost(self, attempt: int, ids: np.ndarray) -> None:
        """Rows img2dataset returned no record of in pass ``attempt``: failed as ``subjob_failed`` (retried)."""
        counts = self.pass_counts.setdefault(attempt, {"rows": 0, "success": 0, "retry": {}, "limited": {}})
        pos = self.position.get_indexer(ids)
        self.attempts[pos] += 1
        self.failed[pos] = True
        self.fail_pass[pos] = attempt
        self.fail_part[pos] = -1
        counts["rows"] += len(ids)
        counts["retry"][-1] = ids  # after every part, as the rows img2dataset lost were listed before

    def retry_ids(self, attempt: int) -> np.ndarray:
        r = self.pass_counts[attempt]["retry"]
        return np.concatenate([r[p] for p in sorted(r, key=lambda p: (p < 0, p))]) if r else np.zeros(0, np.int64)

    def limited_ids(self, attempt: int) -> list[int]:
        r = self.pass_counts[attempt]["limited"]
        return [int(x) for p in sorted(r) for x in r[p]]

    def _add_sources(self, attempt: int, part: int, path: Path, ids: np.ndarray) -> None:
        """The rows of img2dataset part ``part`` of pass ``attempt`` it fetched, under their image parts."""
        if not len(ids):
            return
        k = self.home[self.position.get_indexer(ids)]
        if (k < 0).any():
            raise AssertionError(f"download pass {attempt} fetched rows that were not in the first pass: "
                                 f"{ids[k < 0][:5].tolist()}")
        for kk in np.unique(k).tolist():
            self.sources[kk].append((attempt, part, str(path), ids[k == kk].tolist()))

    # -------------------------------------------------------------- decode jobs

    def job(self, k: int) -> PartJob:
        sources = [(path, ids) for _, _, path, ids in sorted(self.sources[k], key=lambda s: s[:2])]
        captions: dict[int, str] = {}
        if sources:  # the captions of its rows: home part k is the first pass's input file k
            want = {r for _, ids in sources for r in ids}
            f = pd.read_parquet(self.pass_dir(0) / "input" / f"{k:05d}.parquet", columns=["row_id", "caption"])
            captions = {int(r): str(c) for r, c in zip(f["row_id"], f["caption"]) if int(r) in want}
        return PartJob(k, sources, captions, self.cfg, str(self.images_dir / f"part-{k:05d}.parquet"),
                       str(self.decoded_dir / f"part-{k:05d}.parquet"))

    def jobs(self) -> list[PartJob]:
        return [self.job(k) for k in range(self.n)]

    def start(self, ex: Any) -> None:
        self.ex = ex

    def _submit(self, k: int) -> None:
        job = self.job(k)
        job.inner_pool = bool(self.ex.in_process)
        self.sources[k] = []  # in the job now (a submitted part is never submitted again from here)
        self.handles[k] = self.ex.submit(decode_part, job)

    def finish(self) -> list[str]:
        for k in range(self.n):
            if k not in self.handles:
                self._submit(k)
        return [self.handles[k].result() for k in range(self.n)]

    def cancel(self) -> None:
        """On an error: drop the parts not started (a running one finishes its atomic writes)."""
        for h in self.handles.values():
            with contextlib.suppress(Exception):
                h.cancel()

    # -------------------------------------------------------------- the ledger's failure texts

    def failure_messages(self, s: int, e: int) -> dict[int, str]:
        """Row position -> the error message of its last failed fetch, for the failed rows of ``s:e``
        (read from the img2dataset part files that hold them)."""
        pos = s + np.flatnonzero(self.failed[s:e])
        out: dict[int, str] = {}
        if not len(pos):
            return out
        keys = np.stack([self.fail_pass[pos].astype(np.int64), self.fail_part[pos].astype(np.int64)], axis=1)
        for (p, part) in {tuple(k) for k in keys.tolist()}:
            mine = pos[(keys[:, 0] == p) & (keys[:, 1] == part)]
            if part < 0:
                out.update((int(i), _LOST_ROW) for i in mine)
                continue
            f = pd.read_parquet(self.part_file(p, part), columns=["row_id", "error_message"])
            at = self.position.get_indexer(f["row_id"].to_numpy(dtype=np.int64))
            msg = dict(zip(at.tolist(), f["error_message"].tolist()))
            out.update((int(i), msg[int(i)]) for i in mine)
        return out


class _DecodedRows:
    """The decode results of the image parts (files from :func:`decode_part`), read back one part at a
    time in row order: :meth:`upto` hands over the results of the rows before a row position.  Image
    part k holds rows of the first pass's input k * number_sample_per_shard on (in row order), so the
    parts follow each other in row order; memory: one part's compact results."""

    def __init__(self, paths: list[str], position: pd.Index) -> None:
        self.paths = iter(paths)
        self.position = position
        self.res = pd.DataFrame({n: pd.Series([], dtype=object) for n in RESULT_SCHEMA.names})
        self.pos = np.zeros(0, dtype=np.int64)
        self.done = False

    def upto(self, e: int) -> tuple[pd.DataFrame, np.ndarray]:
        while not self.done and (not len(self.pos) or self.pos[-1] < e):
            path = next(self.paths, None)
            if path is None:
                self.done = True
                break
            f = pq.read_table(path).to_pandas().astype(object)
            p = self.position.get_indexer(f["row_id"].astype("int64").to_numpy())
            order = np.argsort(p, kind="stable")
            f, p = f.iloc[order], p[order]
            if len(self.pos) and len(p) and p[0] <= self.pos[-1]:
                raise AssertionError(f"decode results of {path} are not after the previous part's in row order")
            self.res = pd.concat([self.res, f], ignore_index=True) if len(self.res) else f.reset_index(drop=True)
            self.pos = np.concatenate([self.pos, p])
        take = int(np.searchsorted(self.pos, e))
        out, out_pos = self.res.iloc[:take], self.pos[:take]
        self.res, self.pos = self.res.iloc[take:].reset_index(drop=True), self.pos[take:]
        return out, out_pos


def _clock() -> tuple[float, float]:
    """(wall, CPU of this process and its finished children) in seconds."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


ROWS_SCHEMA = pa.schema([("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                         ("skip_reason", pa.string())])


def _url_batches(url_list: Any, cfg: DownloadConfig) -> Iterator[pd.DataFrame]:
    """``run_download``'s input as batches: a path (read and checked by :func:`iter_checked_url_list`), an
    iterable of batches (such as its second result), or one table (sliced)."""
    if isinstance(url_list, (str, Path)):
        yield from iter_checked_url_list(url_list, cfg.url_col, cfg.caption_col, cfg.on_duplicate_urls)[1]
    elif isinstance(url_list, pd.DataFrame):
        for s in range(0, len(url_list), URL_BATCH_ROWS):
            yield url_list.iloc[s:s + URL_BATCH_ROWS]
    else:
        yield from url_list


def _spill_rows(batches: Iterator[pd.DataFrame], cfg: DownloadConfig, rows_dir: Path,
                first_input: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the input batches: the ledger's input columns (row_id, url as recorded, caption,
    skip_reason) go to ``rows_dir/part-NNNNN.parquet``, one per ledger part, and the rows to fetch to
    the first pass's img2dataset input (:func:`_write_shards`).  Returns the row ids of every row and of
    the rows to fetch (compact).  Memory: a batch and a part."""
    step = max(1, cfg.number_sample_per_shard)
    rows_dir.mkdir(parents=True, exist_ok=True)
    ids: list[np.ndarray] = []
    n_private = 0
    buf: list[pd.DataFrame] = []
    n_buf = n_files = 0

    def flush(n: int) -> None:
        nonlocal buf, n_buf, n_files
        t = pd.concat(buf, ignore_index=True) if len(buf) > 1 else buf[0].reset_index(drop=True)
        _write_atomic(pa.Table.from_pandas(t.iloc[:n], schema=ROWS_SCHEMA, preserve_index=False),
                      rows_dir / f"part-{n_files:05d}.parquet")
        n_files += 1
        rest = t.iloc[n:]
        buf, n_buf = ([rest] if len(rest) else []), len(rest)

    def fetchable() -> Iterator[pd.DataFrame]:
        nonlocal n_buf, n_private
        for b in batches:
            if not len(b):
                continue
            skip = b["skip_reason"].astype(object).where(b["skip_reason"].notna(), None)
            # ``record_url`` (optional) is what the ledger keeps when the fetched URL holds an execution
            # detail (the embedded world's ephemeral port); a user's URL is recorded as given
            if not cfg.allow_private_addresses and "record_url" not in b.columns:
                # a user's list (the world's table carries record_url and is served by our own loopback server)
                private = skip.isna().to_numpy() & b["url"].map(is_private_host).to_numpy(dtype=bool)
                if private.any():
                    skip = skip.copy()
                    skip[private] = "private_address"
                    n_private += int(private.sum())
            rid = b["row_id"].to_numpy(dtype=np.int64)
            ids.append(rid)
            recorded = b["record_url"] if "record_url" in b.columns else b["url"]
            buf.append(pd.DataFrame({"row_id": rid, "url": recorded.to_numpy(), "caption": b["caption"].to_numpy(),
                                     "skip_reason": skip.to_numpy()}))
            n_buf += len(b)
            while n_buf >= step:
                flush(step)
            todo = skip.isna().to_numpy()
            yield pd.DataFrame({"row_id": rid[todo], "url": b["url"].to_numpy()[todo],
                                "caption": b["caption"].to_numpy()[todo]})

    first = _write_shards(fetchable(), first_input, step)
    if n_buf or not n_files:
        if not buf:
            buf = [pd.DataFrame({n: pd.Series([], dtype="int64" if n == "row_id" else object)
                                 for n in ROWS_SCHEMA.names})]
        flush(n_buf)
    if n_private:
        log.warning("%d URL(s) point to a private or loopback address and are skipped (set "
                    "download.allow_private_addresses=true to fetch them)", n_private)
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)), first


def run_download(url_list: Any, cfg: DownloadConfig, out_dir: Path,
                 progress: bool = True, runner: str | None = None,
                 timings: dict[str, float] | None = None, overlap: bool = True) -> dict[str, Any]:
    """Download ``url_list`` into ``out_dir``: the path of a URL list (read and checked in batches by
    :func:`iter_checked_url_list`), its checked batches, or a table like one (from :func:`read_url_list`;
    row_id, url, caption, skip_reason, optionally record_url).

    Writes the ledger as ``out_dir/ledger/part-NNNNN.parquet`` (one row per input row, in row
    order, ``url`` from ``record_url`` where the table has one; read it with
    :func:`imagegen.stages.ledger.read_ledger`) and
    ``out_dir/images/part-NNNNN.parquet`` (key, row_id, image, ext, sha256, width, height,
    caption), one image part per img2dataset part of the first pass (rows recovered by a retry
    pass go back to the part of their input row, so parts stay in key order).  The input is
    streamed once into per-part files (the ledger's input columns, img2dataset's input files); the
    driver keeps compact numpy columns only (row ids, attempts, a status code, where a row last
    failed: its message stays in img2dataset's part file), and the ledger is assembled a part at a
    time.  Decoding is a map step over parts on ``runner`` (see :mod:`imagegen.executors`; default: a
    local pool of ``cfg.processes_count``).
    Returns the counts for the stage card.  ``timings`` (a benchmark's dict, never part of the
    counts) receives the wall and CPU seconds of the fetch passes (with the decode that overlapped
    them), the decode after them and the ledger.

    ``overlap`` (an execution knob: the same bytes either way): decode each image part while
    img2dataset still fetches the others, as soon as every row of the part has its final outcome
    (:class:`_PartPlan`), on an executor that takes parts one at a time (``submit``); False, one
    part, ``local:1`` or an orchestrator's mapper: every part after the fetch.
    """
    from imagegen.executors import executor

    clock = [_clock()]

    def lap(name: str) -> None:
        now = _clock()
        if timings is not None:
            timings[f"{name}_wall_s"] = round(now[0] - clock[-1][0], 3)
            timings[f"{name}_cpu_s"] = round(now[1] - clock[-1][1], 3)
        clock.append(now)

    work = out_dir / "_img2dataset"
    shutil.rmtree(work, ignore_errors=True)
    rows_dir = out_dir / "_rows"   # the ledger's input columns, a ledger part a file
    row_ids, first_ids = _spill_rows(_url_batches(url_list, cfg), cfg, rows_dir, work / "pass0" / "input")
    n_rows = len(row_ids)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    decoded_dir = out_dir / "_decoded"   # each part's compact decode results, read back for the ledger
    decoded_dir.mkdir(parents=True, exist_ok=True)
    plan = _PartPlan(row_ids, first_ids, cfg, work, images_dir, decoded_dir)
    n_parts = plan.n
    spec = runner or "local"
    passes = []
    pass_ids, first_ids = first_ids, None  # the first pass's row ids: let go once that pass is done
    engine_info: dict[str, Any] | None = None
    results: list[str] | None = None
    delegated = None  # an orchestrator's executor (no engine of its own), reused for the map after the fetch
    with contextlib.ExitStack() as engine:  # the distributor's engine (Ray, Spark) for every pass
        if len(pass_ids):
            engine_info = engine.enter_context(distributor_session(cfg))
        ex = None
        # A Ray runner and the Ray distributor would share this process's one Ray connection, and the
        # distributor's Ray (its own CPUs or another cluster) is shut at the end of the fetch: with both,
        # the decode runs after the fetch, on the runner's own Ray.
        both_ray = cfg.distributor == "ray" and spec.split(":", 1)[0] == "ray"
        if overlap and n_parts > 1 and spec != "local:1" and not both_ray:
            # decode overlaps the fetch: each image part is submitted as soon as img2dataset has finished
            # every row of it (see _PartPlan), while img2dataset keeps running on this thread
            ex = engine.enter_context(executor(spec, root=out_dir, workers=cfg.processes_count))
            if ex.supports_submit:
                ex.warm()  # a local pool forks here, before the part watcher's thread starts
                plan.start(ex)
            else:  # an orchestrator's mapper takes whole lists: its map after the fetch
                delegated, ex = ex, None
        try:
            for attempt in range(1 + cfg.retry_passes):
                if not len(pass_ids):
                    break
                if attempt:  # the rows to retry, from the previous pass's input (in row order)
                    keep = np.sort(pass_ids)
                    pass_ids = _write_shards(
                        (b[np.isin(b["row_id"].to_numpy(dtype=np.int64), keep)]
                         for b in _read_shards(plan.pass_dir(attempt - 1) / "input")),
                        plan.pass_dir(attempt) / "input", plan.step)
                lost = _img2dataset_pass(plan.pass_dir(attempt), pass_ids, cfg,
                                         on_part=plan.part_fetched(attempt, submit=ex is not None),
                                         watch=ex is not None)
                plan.lost(attempt, lost)
                c = plan.pass_counts[attempt]
                retry_ids = plan.retry_ids(attempt)
                passes.append({"pass": attempt, "rows": int(c["rows"]), "success": int(c["success"]),
                               "transient_failures": len(retry_ids)})
                if progress:
                    log.info("download pass %d: %d rows, %d fetched, %d to retry", attempt, c["rows"], c["success"],
                             len(retry_ids))
                pass_ids = retry_ids
                limited = plan.limited_ids(attempt)
                if len(pass_ids) and limited and attempt < cfg.retry_passes:
                    # 429/503: wait what the server asks (Retry-After), then ask again
                    urls: dict[int, str] = {}
                    for b in _read_shards(plan.pass_dir(attempt) / "input", ["row_id", "url"]):
                        hit = np.isin(b["row_id"].to_numpy(dtype=np.int64), limited)
                        urls.update(zip(b["row_id"].to_numpy()[hit].tolist(), b["url"].to_numpy()[hit].tolist()))
                    live = [urls[r] for r in limited]
                    wait = wait_before_retry(live, cfg.retry_wait, cfg.retry_after_max, cfg.timeout, cfg.user_agent_token)
                    log.info("download pass %d: %d rate-limited row(s); waiting %.3g s (%s; probed %s) before pass %d",
                             attempt, len(limited), wait["wait_s"], wait["source"], wait["probed"], attempt + 1)
                    passes[-1].update(rate_limited=len(limited), wait_s=wait["wait_s"], wait_source=wait["source"])
                    time.sleep(wait["wait_s"])
            lap("fetch")
            if ex is not None:
                results = plan.finish()  # the parts not submitted yet (rows retried to the last pass), then all
        except BaseException:
            plan.cancel()
            raise

    if results is None:  # decode, part by part, after the fetch
        jobs = plan.jobs()
        if len(jobs) == 1 or spec == "local:1":
            for j in jobs:
                j.inner_pool = True
            results = [decode_part(j) for j in jobs]
        else:
            with (contextlib.nullcontext(delegated) if delegated is not None else
                  executor(spec, root=out_dir, workers=cfg.processes_count)) as ex:
                if ex.in_process:
                    for j in jobs:
                        j.inner_pool = True
                results = ex.map(decode_part, jobs)
        del jobs
    decoded = _DecodedRows(results, plan.position)  # the decode results in row order, a part at a time
    lap("decode")

    writer = LedgerWriter(out_dir, cfg.number_sample_per_shard, LEDGER_SCHEMA)
    summary = LedgerSummary()
    step = plan.step
    for k, s in enumerate(range(0, n_rows, step)):
        e = min(n_rows, s + step)
        res, res_pos = decoded.upto(e)
        rows = pq.read_table(rows_dir / f"part-{k:05d}.parquet").to_pandas()
        part = _ledger_part(s, e, rows, plan, res, res_pos)
        summary.add(part)
        writer.add(part)
        del part, res, rows
    writer.close()
    shutil.rmtree(decoded_dir, ignore_errors=True)
    shutil.rmtree(rows_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    lap("ledger")

    counts = summary.result()
    counts["passes"] = passes
    counts["parts"] = n_parts
    counts["distributor"] = engine_info  # what fetched (execution only; None: nothing to fetch)
    return counts


LEDGER_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("error", pa.string()), ("attempts", pa.int64()), ("key", pa.string()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("original_mode", pa.string()),
    ("original_format", pa.string()), ("exif_transposed", pa.bool_()), ("width", pa.int64()),
    ("height", pa.int64()), ("source_sha256", pa.string()), ("sha256", pa.string())])
assert LEDGER_SCHEMA.names == LEDGER_COLUMNS


def ledger_frame(ledger: pd.DataFrame) -> pd.DataFrame:
    """``ledger``'s columns in ledger order with the ledger's dtypes (nullable integers and booleans)."""
    ledger = ledger[LEDGER_COLUMNS].copy()
    for col in ("attempts", "original_width", "original_height", "width", "height"):
        ledger[col] = ledger[col].astype("Int64")
    ledger["exif_transposed"] = ledger["exif_transposed"].astype("boolean")
    return ledger


def _ledger_part(s: int, e: int, rows: pd.DataFrame, plan: _PartPlan, res: pd.DataFrame,
                 res_pos: np.ndarray) -> pd.DataFrame:
    """The ledger rows of row positions ``s:e``: the input row (``rows``, from the spilled input), its
    passes' outcome (``plan``; a failure's message read back from its part file), its decode result."""
    n = e - s
    skip = rows["skip_reason"].to_numpy(dtype=object)
    skipped = pd.notna(skip)
    status = np.full(n, None, dtype=object)
    reason = np.full(n, None, dtype=object)
    error = np.full(n, None, dtype=object)
    status[skipped] = "skipped"
    reason[skipped] = skip[skipped]
    failed = plan.failed[s:e] & ~skipped
    status[failed] = "failed"
    msgs = plan.failure_messages(s, e)
    for i in np.flatnonzero(failed).tolist():
        error[i] = msgs[s + i]
        reason[i] = classify_error(error[i])
    part = pd.DataFrame({"row_id": rows["row_id"].to_numpy(dtype=np.int64), "url": rows["url"].to_numpy(dtype=object),
                         "caption": rows["caption"].to_numpy(dtype=object),
                         "status": status, "reason": reason, "error": error, "attempts": plan.attempts[s:e],
                         "key": None})
    for col in _RESULT_FIELDS:
        part[col] = None
    a, b = np.searchsorted(res_pos, [s, e])
    if b > a:
        mine = res.iloc[a:b]
        at = res_pos[a:b] - s
        ok = mine["ok"].astype(bool).to_numpy()
        part.loc[at[ok], list(_RESULT_FIELDS)] = mine.loc[ok, list(_RESULT_FIELDS)].to_numpy()
        part.loc[at, "status"] = np.where(ok, "success", "failed")
        part.loc[at, "reason"] = mine["reason"].to_numpy()
        part.loc[at, "error"] = mine["error"].to_numpy()
    succ = (part["status"] == "success").to_numpy()
    part.loc[succ, "key"] = [f"{int(r):09d}" for r in part.loc[succ, "row_id"]]
    return ledger_frame(part)


class LedgerSummary:
    """The stage card's counts of a ledger, added up part by part (memory: the row ids, 8 bytes a row)."""

    def __init__(self) -> None:
        self.rows = 0
        self.by_status: dict[str, int] = {}
        self.reasons: dict[str, int] = {}
        self.retried = self.recovered = self.exif = 0
        self.missing_status = False
        self.ids: list[np.ndarray] = []

    def add(self, ledger: pd.DataFrame) -> None:
        self.rows += len(ledger)
        for k, v in ledger["status"].value_counts().items():
            self.by_status[str(k)] = self.by_status.get(str(k), 0) + int(v)
        for k, v in ledger.loc[ledger["status"] != "success", "reason"].value_counts().items():
            self.reasons[str(k)] = self.reasons.get(str(k), 0) + int(v)
        att = ledger["attempts"]
        self.retried += int((att > 1).sum())
        self.recovered += int(((att > 1) & (ledger["status"] == "success")).sum())
        self.exif += int(ledger["exif_transposed"].astype("boolean").fillna(False).sum())
        self.missing_status |= bool(ledger["status"].isna().any())
        # a copy: a view would keep the part's whole int64 block (row_id and attempts, 16 bytes a row)
        self.ids.append(ledger["row_id"].to_numpy(dtype=np.int64, copy=True))

    def result(self) -> dict[str, Any]:
        counts = {
            "input_rows": self.rows,
            "success": self.by_status.get("success", 0),
            "failed": self.by_status.get("failed", 0),
            "skipped": self.by_status.get("skipped", 0),
            "reasons": dict(sorted(self.reasons.items())),
            "retried_rows": self.retried,
            "recovered_on_retry": self.recovered,
            "exif_transposed": self.exif,
        }
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int64)
        if counts["success"] + counts["failed"] + counts["skipped"] != counts["input_rows"] or \
                len(np.unique(ids)) != len(ids) or self.missing_status:
            raise AssertionError(f"download ledger does not account for every row: {counts}")
        return counts


def summarize_ledger(ledger: pd.DataFrame) -> dict[str, Any]:
    """Counts that must add up: input = success + failed + skipped, and per reason."""
    summary = LedgerSummary()
    summary.add(ledger)
    return summary.result()


def iter_images(images_dir: Path, columns: list[str] | None = None, batch_rows: int = 1000):
    """Stream the image parts of a download output as pyarrow record batches."""
    for part in sorted(Path(images_dir).glob("part-*.parquet")):
        pf = pq.ParquetFile(part)
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
