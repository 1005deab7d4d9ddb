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
            url = df[url_col].astype(str).str.strip()
            out = pd.DataFrame({"row_id": np.arange(n, n + len(df), dtype=np.int64), "url": url.to_numpy(),
                                "caption": df[caption_col].fillna("").astype(str).to_numpy()})
            out["skip_reason"] = None
            bad_url = ~out["url"].str.match(r"^https?://[^\s/]+", na=False)
            out.loc[bad_url, "skip_reason"] = "invalid_url"
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
    every valid URL (16 bytes a row kept; measured peak slope about 80 bytes a row while sorting and confirming); rows whose hash repeats are candidates, and a second pass (only
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


def _img2dataset_pass(rows: pd.DataFrame, work: Path, cfg: DownloadConfig) -> tuple[pd.DataFrame, dict[int, Path]]:
    """One img2dataset run over ``rows`` (row_id, url, caption).

    img2dataset writes its own parts (``work/out/NNNNN.parquet``, one per
    ``number_sample_per_shard`` input rows, in input order: part ``k`` holds input rows
    ``k * number_sample_per_shard`` on) and streams to disk; this returns only the compact columns of
    every row (row_id, status, error_message, part: the part's number, -1 for a row img2dataset lost)
    and the part files by number (a lost subjob's part is absent).
    """
    # img2dataset imports albumentations, which phones home for updates at import in every
    # spawned worker; offline that costs seconds per process.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as i2d_download

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # its input in parts of one shard each (img2dataset reads one input file whole, and numbers the shards
    # of a folder's files on from each other: part file i is shard i), never the whole list in one file
    inp = work / "input"
    inp.mkdir()
    step = max(1, cfg.number_sample_per_shard)
    cols = rows[["row_id", "url", "caption"]]
    for i, s0 in enumerate(range(0, len(cols), step)):
        cols.iloc[s0:s0 + step].to_parquet(inp / f"{i:05d}.parquet", index=False)
    del cols
    out = work / "out"
    with stdout_to_stderr():  # img2dataset's progress prints would break a caller's stdout (``--json``)
        i2d_download(
            url_list=str(inp), input_format="parquet", url_col="url", caption_col="caption",
            output_format="parquet", output_folder=str(out), save_additional_columns=["row_id"],
            disable_all_reencoding=True, encode_format="jpg", image_size=cfg.image_size,
            processes_count=cfg.processes_count, thread_count=cfg.thread_count,
            timeout=cfg.timeout, retries=cfg.retries, distributor=cfg.distributor,
            number_sample_per_shard=cfg.number_sample_per_shard, user_agent_token=cfg.user_agent_token,
            compute_hash="sha256", extract_exif=False, enable_wandb=False,
        )
    parts = {int(p.stem): p for p in sorted(out.glob("*.parquet"))}
    frames = []
    for i, p in parts.items():  # compact columns only: the image bytes stay in the part files
        f = pd.read_parquet(p, columns=["row_id", "status", "error_message"])
        f["part"] = i
        frames.append(f)
    got = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {"row_id": pd.Series([], dtype="int64"), "status": [], "error_message": [], "part": []})
    missing = set(rows["row_id"]) - set(got["row_id"])
    if missing:  # img2dataset lost rows (a crashed subjob): account for them, never drop silently
        extra = pd.DataFrame({"row_id": sorted(missing), "status": "failed_to_download",
                              "error_message": _LOST_ROW,
                              "part": -1})
        got = pd.concat([got, extra], ignore_index=True)
    return got, parts


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


def run_download(url_list: pd.DataFrame, cfg: DownloadConfig, out_dir: Path,
                 progress: bool = True, runner: str | None = None,
                 timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Download ``url_list`` (from :func:`read_url_list`) into ``out_dir``.

    Writes the ledger as ``out_dir/ledger/part-NNNNN.parquet`` (one row per input row, in row
    order, ``url`` from ``record_url`` where the table has one; read it with
    :func:`imagegen.stages.ledger.read_ledger`) and
    ``out_dir/images/part-NNNNN.parquet`` (key, row_id, image, ext, sha256, width, height,
    caption), one image part per img2dataset part of the first pass (rows recovered by a retry
    pass go back to the part of their input row, so parts stay in key order).  Passes keep only
    compact columns in memory; decoding is a map step over parts on ``runner`` (see
    :mod:`imagegen.executors`; default: a local pool of ``cfg.processes_count``).
    Returns the counts for the stage card.  ``timings`` (a benchmark's dict, never part of the
    counts) receives the wall and CPU seconds of the fetch passes, the decode and the ledger.
    """
    from imagegen.executors import executor

    clock = [_clock()]

    def lap(name: str) -> None:
        now = _clock()
        if timings is not None:
            timings[f"{name}_wall_s"] = round(now[0] - clock[-1][0], 3)
            timings[f"{name}_cpu_s"] = round(now[1] - clock[-1][1], 3)
        clock.append(now)

    # ``record_url`` (optional) is what the ledger keeps when the fetched URL holds an execution
    # detail (the embedded world's ephemeral port); a user's URL is recorded as given.
    # The driver keeps compact per-row columns only (attempts, a status code, the reasons of rows
    # that did not succeed); the ledger's rows are built and written one part at a time.
    row_ids = url_list["row_id"].to_numpy(dtype=np.int64)
    n_rows = len(row_ids)
    position = pd.Index(row_ids)                      # row_id -> row position (row order)
    attempts = np.zeros(n_rows, dtype=np.int64)
    state = np.zeros(n_rows, dtype=np.int8)            # 0: none, 1: skipped, 2: failed
    why: dict[int, tuple[str, str | None]] = {}        # row position -> (reason, error) of a skip or failure
    if not cfg.allow_private_addresses and "record_url" not in url_list.columns:
        # a user's list (the world's table carries record_url and is served by our own loopback server)
        private = url_list["skip_reason"].isna() & url_list["url"].map(is_private_host)
        if private.any():
            url_list = url_list.copy()
            url_list.loc[private, "skip_reason"] = "private_address"
            log.warning("%d URL(s) point to a private or loopback address and are skipped (set "
                        "download.allow_private_addresses=true to fetch them)", int(private.sum()))
    skipped = url_list["skip_reason"].notna().to_numpy()
    state[skipped] = 1
    why.update(zip(np.flatnonzero(skipped).tolist(), ((str(r), None) for r in url_list["skip_reason"][skipped])))

    pending = url_list[url_list["skip_reason"].isna()]
    passes = []
    work = out_dir / "_img2dataset"
    part_files: list[dict[int, Path]] = []     # per pass, img2dataset's part files by part number
    fetched: list[pd.DataFrame] = []           # per pass: row_id, part of the rows it fetched
    # row position -> image part: the first-pass img2dataset part of its input row, known from the row's
    # place in that pass's input (also for a row img2dataset lost there and a retry pass fetched)
    home = np.full(n_rows, -1, dtype=np.int64)
    n_parts = 1
    engine_info: dict[str, Any] | None = None
    with contextlib.ExitStack() as engine:  # the distributor's engine (Ray, Spark) for every pass
        if not pending.empty:
            engine_info = engine.enter_context(distributor_session(cfg))
        for attempt in range(1 + cfg.retry_passes):
            if pending.empty:
                break
            got, files = _img2dataset_pass(pending, work / f"pass{attempt}", cfg)
            part_files.append(files)
            if attempt == 0:
                step = max(1, cfg.number_sample_per_shard)
                home[position.get_indexer(pending["row_id"].to_numpy())] = np.arange(len(pending)) // step
                n_parts = max(1, math.ceil(len(pending) / step))
            ok = (got["status"] == "success").to_numpy()
            ids = got["row_id"].to_numpy()
            attempts[position.get_indexer(ids)] += 1
            fetched.append(got.loc[ok, ["row_id", "part"]])
            bad_ids = got.loc[~ok, "row_id"].to_numpy()
            msgs = got.loc[~ok, "error_message"].tolist()
            reasons = [classify_error(m) for m in msgs]
            bad_pos = position.get_indexer(bad_ids)
            state[bad_pos] = 2
            why.update(zip(bad_pos.tolist(), zip(reasons, msgs)))
            retry_ids = [int(r) for r, why_ in zip(bad_ids, reasons) if is_transient(why_)]
            passes.append({"pass": attempt, "rows": int(len(got)), "success": int(ok.sum()),
                           "transient_failures": len(retry_ids)})
            if progress:
                log.info("download pass %d: %d rows, %d fetched, %d to retry", attempt, len(got), int(ok.sum()),
                         len(retry_ids))
            pending = pending[pending["row_id"].isin(retry_ids)]
            limited = [int(r) for r, m, lim in zip(bad_ids, msgs, rate_limited(msgs)) if lim and r in retry_ids]
            if not pending.empty and limited:  # 429/503: wait what the server asks (Retry-After), then ask again
                live = pending.set_index("row_id").loc[limited, "url"].tolist()
                wait = wait_before_retry(live, cfg.retry_wait, cfg.retry_after_max, cfg.timeout, cfg.user_agent_token)
                log.info("download pass %d: %d rate-limited row(s); waiting %.3g s (%s; probed %s) before pass %d",
                         attempt, len(limited), wait["wait_s"], wait["source"], wait["probed"], attempt + 1)
                passes[-1].update(rate_limited=len(limited), wait_s=wait["wait_s"], wait_source=wait["source"])
                time.sleep(wait["wait_s"])

    lap("fetch")
    # decode, part by part: each image part gathers its rows from every pass's img2dataset parts
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    captions = url_list["caption"].to_numpy()
    decoded_dir = out_dir / "_decoded"   # each part's compact decode results, read back for the ledger
    decoded_dir.mkdir(parents=True, exist_ok=True)
    by_home: list[list[tuple[str, list[int]]]] = [[] for _ in range(n_parts)]
    for p, got in enumerate(fetched):  # each pass's fetched rows, grouped by (image part, img2dataset part)
        if got.empty:
            continue
        ids_all = got["row_id"].to_numpy(dtype=np.int64)
        k_all = home[position.get_indexer(ids_all)]
        if (k_all < 0).any():
            raise AssertionError(f"download pass {p} fetched rows that were not in the first pass: "
                                 f"{ids_all[k_all < 0][:5].tolist()}")
        for (k, part), g in pd.DataFrame({"k": k_all, "part": got["part"].to_numpy(), "row_id": ids_all}).groupby(
                ["k", "part"], sort=True):
            by_home[int(k)].append((str(part_files[p][int(part)]), g["row_id"].tolist()))
    jobs = []
    for k in range(n_parts):
        sources = by_home[k]
        rows = [r for _, ids in sources for r in ids]
        jobs.append(PartJob(k, sources, {r: str(captions[i]) for r, i in zip(rows, position.get_indexer(rows))},
                            cfg, str(images_dir / f"part-{k:05d}.parquet"),
                            str(decoded_dir / f"part-{k:05d}.parquet")))
    spec = runner or "local"
    if len(jobs) == 1 or spec == "local:1":
        for j in jobs:
            j.inner_pool = True
        results = [decode_part(j) for j in jobs]
    else:
        with executor(spec, root=out_dir, workers=cfg.processes_count) as ex:
            if ex.in_process:
                for j in jobs:
                    j.inner_pool = True
            results = ex.map(decode_part, jobs)
    del jobs
    decoded = _DecodedRows(results, position)  # the decode results in row order, a part at a time
    lap("decode")
    shutil.rmtree(work, ignore_errors=True)

    recorded = url_list["record_url"] if "record_url" in url_list.columns else url_list["url"]
    recorded = recorded.to_numpy()
    writer = LedgerWriter(out_dir, cfg.number_sample_per_shard, LEDGER_SCHEMA)
    summary = LedgerSummary()
    step = max(1, cfg.number_sample_per_shard)
    for s in range(0, n_rows, step):
        e = min(n_rows, s + step)
        res, res_pos = decoded.upto(e)
        part = _ledger_part(s, e, row_ids, recorded, captions, attempts, state, why, res, res_pos)
        summary.add(part)
        writer.add(part)
        del part, res
    writer.close()
    shutil.rmtree(decoded_dir, ignore_errors=True)
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


def _ledger_part(s: int, e: int, row_ids: np.ndarray, recorded: np.ndarray, captions: np.ndarray,
                 attempts: np.ndarray, state: np.ndarray, why: dict[int, tuple[str, str | None]],
                 res: pd.DataFrame, res_pos: np.ndarray) -> pd.DataFrame:
    """The ledger rows of row positions ``s:e``: the input row, its passes' outcome, its decode result."""
    n = e - s
    status = np.full(n, None, dtype=object)
    reason = np.full(n, None, dtype=object)
    error = np.full(n, None, dtype=object)
    st = state[s:e]
    status[st == 1] = "skipped"
    status[st == 2] = "failed"
    for i in np.flatnonzero(st).tolist():
        reason[i], error[i] = why[s + i]
    part = pd.DataFrame({"row_id": row_ids[s:e], "url": recorded[s:e], "caption": captions[s:e],
                         "status": status, "reason": reason, "error": error, "attempts": attempts[s:e],
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
        self.ids.append(ledger["row_id"].to_numpy(dtype=np.int64))

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
