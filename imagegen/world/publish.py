"""The world published the way web data is: URLs + alt text, with faults planted and recorded.

``publish_world`` turns scenes into a folder a loopback HTTP server (``server.py``) can serve:
the bytes of every URL, a route table saying how each URL misbehaves, the URL list a downloader
sees (``urls.parquet``: path + alt text) and the ground truth of every row (``truth.parquet``).
Faults are planted in exact numbers (``round(rate * n_images)``, at least one when the rate is
positive) so a small world with boosted rates contains every kind, and every later stage
(download, dedup, filter, recaption) can be scored against what was planted.

Truth columns ``expected_download`` and ``expected_bad`` say what a correct pipeline sees:
``expected_download`` is the HTTP outcome for a client that follows redirects, retries once on a
5xx and times out before ``stall_seconds``; ``expected_bad`` marks images a quality filter should
drop (tiny, extreme aspect, blank, undecodable, grayscale: the caption names colours the pixels
lack). CMYK, RGBA, 16-bit and EXIF-rotated images are *not* bad: decoded properly (converted to
RGB, EXIF orientation applied) they are the upright scene.

Content kinds (``CONTENT_KINDS``, off unless their rate is set) plant what the content filters of
:mod:`imagegen.filters` must catch: ``nsfw`` serves a drawn figure NudeNet flags instead of the
scene, ``text`` draws a word over the scene, ``blocklisted`` serves a clean scene whose hashes are
written to ``blocklist.txt`` (the list a user would supply).  Truth ``detail`` records the word,
the figure or the listed hashes, and ``expected_filter`` the filter that should drop the row.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.hashing import bytes_sha256, canonical_json, code_version, stable_hash
from imagegen.world import scene as scene_mod
from imagegen.world.scene import WorldConfig, make_scene, render

FAILURE_KINDS: tuple[str, ...] = ("not_found", "flaky", "timeout", "truncated", "html", "redirect")
BAD_IMAGE_KINDS: tuple[str, ...] = (
    "tiny", "extreme_aspect", "blank", "corrupt", "cmyk", "grayscale", "alpha", "png16", "exif_rotated",
)
DUP_KINDS: tuple[str, ...] = ("exact_dup", "near_dup")
PLANTED_KINDS: tuple[str, ...] = ("clean", *DUP_KINDS, *FAILURE_KINDS, *BAD_IMAGE_KINDS)
# Planted only when their rate is positive (so default worlds keep their images and counts).
CONTENT_KINDS: tuple[str, ...] = ("nsfw", "text", "blocklisted")
EXPECTED_FILTER = {"nsfw": "nsfw_nudenet", "text": "text_ocr", "blocklisted": "hash_blocklist"}
BLOCKLIST_FILE = "blocklist.txt"
NSFW_MIN_SIZE = 64  # below this NudeNet does not see the drawn figure (measured: median score 0 at 32 px)
CAPTION_NOISE: tuple[str, ...] = ("none", "uninformative", "wrong")
# Planted kinds whose HTTP fetch fails for a client that retries once and follows redirects.
FAILED_DOWNLOAD = frozenset({"not_found", "timeout", "truncated", "html"})
# Planted kinds a quality filter should drop (see module docstring for why grayscale is here).
BAD_IMAGES = frozenset({"tiny", "extreme_aspect", "blank", "corrupt", "grayscale"})
NEAR_DUP_TRANSFORMS: tuple[str, ...] = ("jpeg", "resize", "shift", "crop")
NEAR_DUP_MAX_DISTANCE = 4  # phash bits between a near duplicate and its source
BASE_MIN_DISTANCE = 11  # phash bits between any two base scenes (i.e. "farther than 10")

UNINFORMATIVE_FIXED = ("image", "untitled", "photo", "picture", "img", "thumbnail", "placeholder", "click here")

CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "html": "text/html; charset=utf-8"}


def _rate(description: str, default: float) -> Any:
    return Field(default, ge=0.0, le=1.0, description=description)


class PublishConfig(BaseModel):
    """How the world is put on the web: how many images, and how often each fault appears."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, ge=0, description="seed for fault placement, noise and shuffling")
    n_images: int = Field(
        300, ge=1, le=100_000, description="base scenes (one URL each, before duplicates); phash checks are O(n^2)"
    )
    png_rate: float = _rate("fraction of normal images served as PNG instead of JPEG", 0.2)
    jpeg_quality: int = Field(95, ge=30, le=100, description="JPEG quality of normal images")
    stall_seconds: float = Field(6.0, gt=0, le=600, description="how long 'timeout' URLs stall before answering")
    # duplicates (extra URLs, counted against n_images)
    exact_dup_rate: float = _rate("extra URLs serving the same bytes as a clean base URL", 0.05)
    near_dup_rate: float = _rate("extra URLs serving a lightly transformed clean base image", 0.05)
    # HTTP faults
    not_found_rate: float = _rate("404 Not Found", 0.02)
    flaky_rate: float = _rate("500 on the first request, 200 on the retry", 0.02)
    timeout_rate: float = _rate("stall longer than stall_seconds before answering", 0.01)
    truncated_rate: float = _rate("Content-Length larger than the body sent, then close", 0.02)
    html_rate: float = _rate("200 text/html page instead of an image", 0.02)
    redirect_rate: float = _rate("302 to the real image (a success)", 0.03)
    # image faults
    tiny_rate: float = _rate("8x8 image", 0.01)
    extreme_aspect_rate: float = _rate("image stretched to 4x wide, 1/4 high (256x16 at 64)", 0.01)
    blank_rate: float = _rate("solid single-colour image", 0.01)
    corrupt_rate: float = _rate("JPEG header followed by garbage (undecodable)", 0.01)
    cmyk_rate: float = _rate("CMYK JPEG", 0.01)
    grayscale_rate: float = _rate("grayscale (mode L) JPEG", 0.01)
    alpha_rate: float = _rate("RGBA PNG", 0.01)
    png16_rate: float = _rate("16-bit-per-channel RGB PNG", 0.01)
    exif_rotated_rate: float = _rate("JPEG stored rotated with an EXIF Orientation tag", 0.01)
    # content the filters of imagegen.filters must catch (off by default)
    nsfw_rate: float = _rate("drawn figure NudeNet flags as exposed (needs image_size >= 64)", 0.0)
    text_rate: float = _rate("a word drawn over the scene, off the objects (~1/4 of the side tall)", 0.0)
    blocklisted_rate: float = _rate("clean scene whose phash and sha256 are listed in blocklist.txt", 0.0)
    # caption noise (over all URL rows)
    uninformative_rate: float = _rate("alt text like 'IMG_2931.jpg' or 'untitled'", 0.1)
    wrong_rate: float = _rate("alt text of a different scene", 0.1)

    def count(self, kind: str, n: int | None = None) -> int:
        """Planted rows of ``kind``: round(rate * n), at least 1 when the rate is positive."""
        rate = getattr(self, f"{kind}_rate")
        n = self.n_images if n is None else n
        return max(1, round(rate * n)) if rate > 0 else 0

    @model_validator(mode="after")
    def _fits(self) -> PublishConfig:
        faults = {k: self.count(k) for k in (*FAILURE_KINDS, *BAD_IMAGE_KINDS, *CONTENT_KINDS)}
        need_clean = 1 if (self.exact_dup_rate > 0 or self.near_dup_rate > 0) else 0
        if sum(faults.values()) + need_clean > self.n_images:
            raise ValueError(
                f"fault rates plant {sum(faults.values())} faulty rows (+{need_clean} clean row for "
                f"duplicates) in only n_images={self.n_images}; lower the rates or raise n_images"
            )
        if self.uninformative_rate + self.wrong_rate > 1:
            raise ValueError(
                f"uninformative_rate + wrong_rate = {self.uninformative_rate + self.wrong_rate} > 1"
            )
        return self


# ------------------------------------------------------------------------------- encoding


def encode(img: Image.Image, fmt: str, quality: int = 95, exif: bytes | None = None) -> bytes:
    """Deterministic bytes for ``img`` ("jpg" or "png"); no timestamps or random metadata."""
    buf = io.BytesIO()
    if fmt == "jpg":
        kwargs: dict[str, Any] = {"quality": quality, "optimize": False, "subsampling": 0 if quality >= 90 else 2}
        if exif is not None:
            kwargs["exif"] = exif
        img.save(buf, "JPEG", **kwargs)
    elif fmt == "png":
        img.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use 'jpg' or 'png'")
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png16(img: Image.Image) -> bytes:
    """16-bit RGB PNG (PIL cannot write one): each 8-bit value v becomes v * 257."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint16) * 257
    h, w, _ = arr.shape
    rows = arr.astype(">u2").reshape(h, w * 3).view(np.uint8).reshape(h, w * 6)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + _png_chunk(b"IEND", b"")


def decode_upright(data: bytes) -> Image.Image:
    """Decode bytes the way a careful pipeline should: apply EXIF orientation, convert to RGB."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        up = ImageOps.exif_transpose(im)
        return up.convert("RGB")


def phash_of(img: Image.Image, size: int) -> imagehash.ImageHash:
    """phash of an upright RGB image after resizing it back to the world's image size."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return imagehash.phash(img)


def hash_u64(h: imagehash.ImageHash | str) -> np.uint64:
    """A 64-bit phash as one integer, so Hamming distances are ``bitwise_count(a ^ b)``."""
    return np.uint64(int(str(h), 16))


def _min_distance(others: np.ndarray, h: np.uint64) -> int:
    """Smallest Hamming distance from ``h`` to an array of uint64 hashes (65 when empty)."""
    if len(others) == 0:
        return 65
    return int(np.bitwise_count(others ^ h).min())


# EXIF orientation -> the transpose that turns the upright image into the stored one; PIL's
# exif_transpose applies the inverse (6 -> ROTATE_270, 8 -> ROTATE_90, 3 -> ROTATE_180).
_STORE_ROTATED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _bad_image(kind: str, img: Image.Image, rng: np.random.Generator, pub: PublishConfig, size: int) -> tuple[bytes, str, dict[str, Any]]:
    """Bytes, file extension and a detail record for a bad-image planted kind."""
    q = pub.jpeg_quality
    if kind == "tiny":
        return encode(img.resize((8, 8), Image.Resampling.BOX), "jpg", q), "jpg", {"size": [8, 8]}
    if kind == "extreme_aspect":
        wh = (size * 4, max(4, size // 4))
        return encode(img.resize(wh, Image.Resampling.BICUBIC), "jpg", q), "jpg", {"size": list(wh)}
    if kind == "blank":
        color = tuple(int(v) for v in np.asarray(img).reshape(-1, 3)[0])  # the background corner
        return encode(Image.new("RGB", (size, size), color), "jpg", q), "jpg", {"color": list(color)}
    if kind == "corrupt":
        data = encode(img, "jpg", q)
        head = 4 + int.from_bytes(data[4:6], "big")  # SOI + the JFIF APP0 segment
        # No 0xFF in the garbage: no marker can appear, so no decoder finds a frame to decode.
        garbage = rng.integers(0, 255, size=len(data) - head, dtype=np.uint8).tobytes()
        return data[:head] + garbage, "jpg", {"valid_header_bytes": head}
    if kind == "cmyk":
        return encode(img.convert("CMYK"), "jpg", q), "jpg", {"mode": "CMYK"}
    if kind == "grayscale":
        return encode(img.convert("L"), "jpg", q), "jpg", {"mode": "L"}
    if kind == "alpha":
        return encode(img.convert("RGBA"), "png"), "png", {"mode": "RGBA"}
    if kind == "png16":
        return encode_png16(img), "png", {"bit_depth": 16}
    if kind == "exif_rotated":
        orientation = int(rng.choice(sorted(_STORE_ROTATED)))
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = img.transpose(_STORE_ROTATED[orientation])
        return encode(stored, "jpg", q, exif=exif.tobytes()), "jpg", {"orientation": orientation}
    raise ValueError(f"unknown bad-image kind {kind!r}; choose from {list(BAD_IMAGE_KINDS)}")


def _content_image(kind: str, sc: Any, img: Image.Image, rng: np.random.Generator, pub: PublishConfig,
                   size: int) -> tuple[bytes, str, dict[str, Any]] | None:
    """Bytes, extension and detail for a content kind; None when this scene cannot carry it."""
    q = pub.jpeg_quality
    detail: dict[str, Any] = {"expected_filter": EXPECTED_FILTER[kind]}
    if kind == "nsfw":
        fig = scene_mod.render_figure(rng, size)
        detail["content"] = "figure"
        return encode(fig, "jpg", q), "jpg", detail
    if kind == "text":
        word = scene_mod.OVERLAY_WORDS[int(rng.integers(len(scene_mod.OVERLAY_WORDS)))]
        drawn = scene_mod.overlay_word(img, sc, word)
        if drawn is None:
            return None
        detail.update(drawn[1])
        return encode(drawn[0], "jpg", q), "jpg", detail
    if kind == "blocklisted":
        data = encode(img, "jpg", q)
        served = hash_u64(phash_of(decode_upright(data), size))
        # the list holds the hash of the "known original": the scene at twice the size, re-encoded;
        # the crawled copy is then a few bits away, as re-encoded copies are
        big = decode_upright(encode(img.resize((2 * size, 2 * size), Image.Resampling.BICUBIC), "jpg", 70))
        listed = hash_u64(phash_of(big, size))
        if int(np.bitwise_count(listed ^ served)) > NEAR_DUP_MAX_DISTANCE:
            listed = served
        detail.update(listed_phash=f"{int(listed):016x}", listed_sha256=bytes_sha256(data),
                      listed_phash_distance=int(np.bitwise_count(listed ^ served)))
        return data, "jpg", detail
    raise ValueError(f"unknown content kind {kind!r}; choose from {list(CONTENT_KINDS)}")


def _near_dup_variant(img: Image.Image, transform: str, strength: int, rng: np.random.Generator, pub: PublishConfig) -> tuple[Image.Image, int, str]:
    """A transformed copy at ``strength`` (3 strongest .. 0 mildest): (image, jpeg quality, label)."""
    size, height = img.size  # width x height (a non-square scene keeps its aspect ratio)
    q = pub.jpeg_quality
    if transform == "jpeg":
        quality = [35, 50, 65, 80][3 - strength]
        return img, quality, f"jpeg_q{quality}"
    if transform == "resize":
        dev = [0.02, 0.04, 0.07, 0.1][strength] * (1 if rng.random() < 0.5 else -1)
        new = max(8, round(size * (1 + dev)))
        new_h = new if height == size else max(8, round(height * new / size))
        return img.resize((new, new_h), Image.Resampling.BICUBIC), q, f"resize_{new / size:.3f}"
    if transform == "shift":
        amount = 1 if strength < 2 else 2
        dx, dy = [int(v) * amount for v in rng.choice([-1, 1], size=2)]
        if strength == 0:
            dy = 0
        arr = np.asarray(img)
        pad = np.pad(arr, ((2, 2), (2, 2), (0, 0)), mode="edge")
        out = pad[2 - dy : 2 - dy + height, 2 - dx : 2 - dx + size]
        return Image.fromarray(np.ascontiguousarray(out)), q, f"shift_{dx}_{dy}"
    if transform == "crop":
        c = [1, 2, 3, 4][strength]
        lt = [int(v) for v in rng.integers(0, c + 1, size=4)]
        lt[int(rng.integers(4))] = c  # at least one side loses c pixels
        box = (lt[0], lt[1], size - lt[2], height - lt[3])
        return img.crop(box), q, f"crop_{lt[0]}_{lt[1]}_{lt[2]}_{lt[3]}"
    raise ValueError(f"unknown near-duplicate transform {transform!r}")


def _make_near_dup(
    scene_img: Image.Image,
    source_hash: imagehash.ImageHash,
    others: np.ndarray,
    rng: np.random.Generator,
    pub: PublishConfig,
) -> tuple[bytes, str, int, np.uint64] | None:
    """Near duplicate within NEAR_DUP_MAX_DISTANCE of its source, milder on each retry.

    It must also stay > 10 bits from ``others`` (hash bits of every other scene's served image and
    of the near duplicates made so far), so it is a near duplicate of its source only.
    """
    size = scene_img.size[0]
    transform = NEAR_DUP_TRANSFORMS[int(rng.integers(len(NEAR_DUP_TRANSFORMS)))]
    tries = [(transform, s) for s in (3, 2, 1, 0)] + [("jpeg", 0)]
    for t, strength in tries:
        img, quality, label = _near_dup_variant(scene_img, t, strength, rng, pub)
        data = encode(img, "jpg", quality)
        h = phash_of(decode_upright(data), size)
        dist = int(h - source_hash)
        hu = hash_u64(h)
        if dist <= NEAR_DUP_MAX_DISTANCE and _min_distance(others, hu) >= BASE_MIN_DISTANCE:
            return data, label, dist, hu
    return None


def _served_hash(row: dict[str, Any], size: int) -> np.uint64 | None:
    """phash of what a row serves, decoded upright; None when it serves no decodable image."""
    if row["planted"] in ("not_found", "html", "corrupt"):
        return None
    return hash_u64(phash_of(decode_upright(row["data"]), size))


def _nearest_other_scene(rows: list[dict[str, Any]], served: list[np.uint64 | None]) -> list[int]:
    """Per row: the smallest phash distance to a served image of a different scene (-1 if n/a)."""
    ok = [k for k, h in enumerate(served) if h is not None and rows[k]["planted"] != "blank"]
    hashes = np.array([served[k] for k in ok], dtype=np.uint64)
    scenes = np.array([rows[k]["scene"].index for k in ok], dtype=np.int64)
    out = [-1] * len(rows)
    for j, k in enumerate(ok):
        other = scenes != scenes[j]
        if other.any():
            out[k] = int(np.bitwise_count(hashes[other] ^ hashes[j]).min())
    return out


def _uninformative(rng: np.random.Generator) -> str:
    k = int(rng.integers(5))
    n = int(rng.integers(10_000))
    if k == 0:
        return f"IMG_{n:04d}.jpg"
    if k == 1:
        return f"DSC{n:04d}.JPG"
    if k == 2:
        return f"{int(rng.integers(2**32)):08x}.png"
    if k == 3:
        return f"Screenshot {2015 + n % 10}-{1 + n % 12:02d}-{1 + n % 28:02d}"
    return UNINFORMATIVE_FIXED[int(rng.integers(len(UNINFORMATIVE_FIXED)))]


def _html_page(row_id: int) -> bytes:
    return (
        "<!doctype html>\n<html><head><title>Image unavailable</title></head>\n"
        f"<body><h1>Sorry!</h1><p>The image you requested ({row_id:06d}) is no longer available. "
        "Sign in to see more photos.</p></body></html>\n"
    ).encode()


# ------------------------------------------------------------------------------- publishing


def publish_id(world: WorldConfig, pub: PublishConfig) -> str:
    """Content name of a published world: both configs plus the code that draws and publishes."""
    return stable_hash(
        {"world": world, "publish": pub, "code": code_version(scene_mod, sys.modules[__name__])}
    )


def _normal_bytes(world: WorldConfig, pub: PublishConfig, index: int, img: Image.Image) -> tuple[bytes, str]:
    """How a clean row serves scene ``index``: JPEG, or PNG for a ``png_rate`` share of scenes."""
    fmt_rng = np.random.default_rng([world.seed, pub.seed, index, 0xF0])
    fmt = "png" if fmt_rng.random() < pub.png_rate else "jpg"
    return encode(img, fmt, pub.jpeg_quality), fmt


def _accept_base_scenes(
    world: WorldConfig, pub: PublishConfig, planted: list[str]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Scenes for the base rows, each > 10 phash bits from every other one as served.

    Row ``k`` gets the next scene index whose served image(s) (the normal encoding and, for a
    bad-image row, the bad variant too, decoded upright) are > 10 bits from every image already
    accepted; the others are skipped (returned as ``rejected``). Blank and corrupt variants are
    exempt: they have no scene left in them to compare.
    """
    n = pub.n_images
    size = world.image_size
    accepted: list[dict[str, Any]] = []
    pool = np.zeros(2 * n, dtype=np.uint64)
    m = 0
    rejected: list[int] = []
    index = 0
    while len(accepted) < n:
        if index > 50 * n + 1000:
            raise RuntimeError(
                f"only {len(accepted)} of {n} scenes are pairwise > 10 phash bits apart after "
                f"{index} tries; the world cannot hold n_images={n} distinct scenes "
                "(lower n_images, or raise image_size or the number of shapes/colours)"
            )
        kind = planted[len(accepted)]
        sc = make_scene(world, index)
        img = render(sc, world)
        data, fmt = _normal_bytes(world, pub, index, img)
        h = phash_of(decode_upright(data), size)
        new = [hash_u64(h)]
        entry: dict[str, Any] = {"scene": sc, "img": img, "data": data, "fmt": fmt, "phash": str(h), "detail": {}}
        if kind in BAD_IMAGE_KINDS:
            vrng = np.random.default_rng([world.seed, pub.seed, index, 0xBAD])
            entry["data"], entry["fmt"], entry["detail"] = _bad_image(kind, img, vrng, pub, size)
            if kind not in ("blank", "corrupt"):
                new.append(hash_u64(phash_of(decode_upright(entry["data"]), size)))
        elif kind in CONTENT_KINDS:
            planted_content = _content_image(kind, sc, img, np.random.default_rng([world.seed, pub.seed, index, 0xC0]),
                                             pub, size)
            if planted_content is None:  # no room for the word in this scene: try the next one
                rejected.append(index)
                index += 1
                continue
            entry["data"], entry["fmt"], entry["detail"] = planted_content
            new.append(hash_u64(phash_of(decode_upright(entry["data"]), size)))
        if min(_min_distance(pool[:m], x) for x in new) < BASE_MIN_DISTANCE:
            rejected.append(index)
        else:
            pool[m : m + len(new)] = new
            m += len(new)
            accepted.append(entry)
        index += 1
    return accepted, rejected


def publish_world(world: WorldConfig, pub: PublishConfig, out_dir: Path) -> dict[str, Any]:
    """Write the published world into ``out_dir`` (absent or empty); return counts per planted kind."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"publish_world needs an empty folder, {out_dir} has files in it")
    if pub.count("nsfw") and world.image_size < NSFW_MIN_SIZE:
        raise ValueError(f"nsfw_rate plants figures NudeNet must flag, and it does not see them below "
                         f"{NSFW_MIN_SIZE} px; this world draws {world.image_size} px images")
    files_dir = out_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    size = world.image_size
    rng = np.random.default_rng([world.seed, pub.seed, 0x5EB])

    # 1. Planted kind of every base row (exact counts, random rows).
    n = pub.n_images
    planted = ["clean"] * n
    order = rng.permutation(n)
    pos = 0
    for kind in (*FAILURE_KINDS, *BAD_IMAGE_KINDS, *CONTENT_KINDS):
        for _ in range(pub.count(kind)):
            planted[int(order[pos])] = kind
            pos += 1
    clean_rows = sorted(int(i) for i in order[pos:])

    # 2. Scenes for them, pairwise far apart in phash as served.
    accepted, rejected = _accept_base_scenes(world, pub, planted)
    rows: list[dict[str, Any]] = [
        {"scene": b["scene"], "img": b["img"], "scene_phash": b["phash"], "planted": kind, "data": b["data"],
         "fmt": b["fmt"], "detail": b["detail"], "dup_of": -1, "transform": "", "distance": -1}
        for b, kind in zip(accepted, planted)
    ]

    # 3. Duplicates of clean rows (originals distinct while there are enough of them).
    n_exact = pub.count("exact_dup") if pub.exact_dup_rate > 0 else 0
    n_near = pub.count("near_dup") if pub.near_dup_rate > 0 else 0
    n_dups = n_exact + n_near
    near_failures = 0
    if n_dups:
        originals = rng.choice(clean_rows, size=n_dups, replace=n_dups > len(clean_rows))
        served = [_served_hash(r, size) for r in rows]
        keep = [k for k, h in enumerate(served) if h is not None and rows[k]["planted"] != "blank"]
        base_hashes = np.array([served[k] for k in keep], dtype=np.uint64)
        base_rows = np.array(keep, dtype=np.int64)
        near_hashes = np.zeros(n_near, dtype=np.uint64)  # near dups made so far, and their sources
        near_src = np.full(n_near, -1, dtype=np.int64)
        n_made = 0
        for j, src in enumerate(int(o) for o in originals):
            base = rows[src]
            if j < n_exact:
                rows.append({**base, "planted": "exact_dup", "dup_of": src, "detail": {}, "distance": 0})
                continue
            others = np.concatenate(
                [base_hashes[base_rows != src], near_hashes[:n_made][near_src[:n_made] != src]]
            )
            source_hash = phash_of(decode_upright(base["data"]), size)
            made = _make_near_dup(base["img"], source_hash, others, rng, pub)
            if made is None:  # rare; skip rather than plant an ambiguous near duplicate
                near_failures += 1
                continue
            data, label, dist, hu = made
            near_hashes[n_made], near_src[n_made] = hu, src
            n_made += 1
            rows.append({**base, "planted": "near_dup", "dup_of": src, "data": data, "fmt": "jpg",
                         "detail": {}, "transform": label, "distance": dist})

    # 4. Caption noise over all rows.
    total = len(rows)
    noise = ["none"] * total
    perm = rng.permutation(total)
    n_uninf = round(pub.uninformative_rate * total)
    n_wrong = round(pub.wrong_rate * total)
    for r in perm[:n_uninf]:
        noise[int(r)] = "uninformative"
    for r in perm[n_uninf : n_uninf + n_wrong]:
        noise[int(r)] = "wrong"
    captions = [r["scene"].caption for r in rows]
    distinct_captions = sorted(set(captions))
    alt: list[str] = []
    for k, r in enumerate(rows):
        if noise[k] == "uninformative":
            alt.append(_uninformative(rng))
        elif noise[k] == "wrong":
            if len(distinct_captions) < 2:  # a one-caption world has no wrong caption to give
                noise[k] = "none"
                alt.append(captions[k])
                continue
            pick = captions[k]
            while pick == captions[k]:
                pick = distinct_captions[int(rng.integers(len(distinct_captions)))]
            alt.append(pick)
        else:
            alt.append(captions[k])

    # 5. What every row serves, hashed, and how close it comes to any other scene's image
    #    (blank rows excluded: all solid images hash alike, and a filter drops them anyway).
    served = [_served_hash(r, size) for r in rows]
    nearest = _nearest_other_scene(rows, served)

    # 6. Shuffle so duplicates are not next to their originals.
    order_final = _shuffle_apart(rows, rng)
    new_id = {old: new for new, old in enumerate(order_final)}

    routes: dict[str, dict[str, Any]] = {}
    truth: list[dict[str, Any]] = []
    for row_id, old in enumerate(order_final):
        r = rows[old]
        kind = r["planted"]
        fmt = r["fmt"]
        path = f"/img/{row_id:06d}.{fmt}"
        file_name: str | None = f"{row_id:06d}.{fmt}"
        content_type = CONTENT_TYPES[fmt]
        detail = dict(r["detail"])
        if kind == "not_found":
            file_name = None
        elif kind == "html":
            file_name = f"{row_id:06d}.html"
            content_type = CONTENT_TYPES["html"]
            (files_dir / file_name).write_bytes(_html_page(row_id))
        if file_name is not None and kind != "html":
            (files_dir / file_name).write_bytes(r["data"])
        route: dict[str, Any] = {"behaviour": "ok", "file": file_name, "target": None, "content_type": content_type}
        if kind in FAILURE_KINDS:
            route["behaviour"] = kind
        if kind == "redirect":
            target = f"/moved/{row_id:06d}.{fmt}"
            route["target"] = target
            routes[target] = {"behaviour": "ok", "file": file_name, "target": None, "content_type": content_type}
            detail["target"] = target
        elif kind == "timeout":
            route["stall_seconds"] = pub.stall_seconds
            detail["stall_seconds"] = pub.stall_seconds
        elif kind == "truncated":
            full = len(r["data"])
            route["content_length"] = full
            route["send_bytes"] = full // 2
            detail.update(content_length=full, sent_bytes=full // 2)
        routes[path] = route
        sc = r["scene"]
        truth.append(
            {
                "row_id": row_id,
                "path": path,
                "alt_text": alt[old],
                "true_caption": sc.caption,
                "scene_index": sc.index,
                "kind": sc.kind,
                "objects": json.dumps(sc.objects, sort_keys=True),
                "relation": json.dumps(sc.relation, sort_keys=True) if sc.relation is not None else None,
                "planted": kind,
                "dup_of_row": new_id[r["dup_of"]] if r["dup_of"] >= 0 else -1,
                "near_dup_transform": r["transform"],
                "phash_distance": r["distance"],
                "caption_noise": noise[old],
                "expected_download": "failure" if kind in FAILED_DOWNLOAD else "success",
                "expected_bad": kind in BAD_IMAGES,
                # extras
                "needs_retry": kind == "flaky",
                "decodable": kind not in ("corrupt", "not_found", "html"),
                "detail": json.dumps(detail, sort_keys=True),
                "scene_phash": r["scene_phash"],
                "served_phash": f"{int(served[old]):016x}" if served[old] is not None else "",
                "nearest_other_scene_distance": nearest[old],
                "content_sha256": bytes_sha256(r["data"]) if file_name is not None and kind != "html" else "",
            }
        )

    measured = [d for d in nearest if d >= 0]
    measured_min = min(measured) if measured else None
    if measured_min is not None and measured_min < BASE_MIN_DISTANCE:  # construction makes this impossible
        raise AssertionError(f"two scenes are only {measured_min} phash bits apart; publish.py is broken")
    guarantees = {
        "phash": "imagehash.phash (8x8) of the decoded image, EXIF-transposed, RGB, resized to image_size",
        "min_distance_between_scenes": BASE_MIN_DISTANCE,
        "near_dup_max_distance_to_source": NEAR_DUP_MAX_DISTANCE,
        "measured_min_distance_between_scenes": measured_min,
        "statement": (
            "Any two served images of different scenes are > 10 phash bits apart (blank and "
            "undecodable rows excepted: they show no scene). Every near_dup row is <= 4 bits from "
            "its source row; exact_dup rows serve their source's bytes. So the only pairs a phash "
            "dedup at threshold <= 10 should find are the planted ones (plus blank rows, which all "
            "hash alike). Column nearest_other_scene_distance records the measured margin per row."
        ),
    }
    summary: dict[str, Any] = {
        "rows": len(truth),
        "base_scenes": n,
        "planted": {k: sum(t["planted"] == k for t in truth)
                    for k in (*PLANTED_KINDS, *(c for c in CONTENT_KINDS if pub.count(c)))},
        "caption_noise": {k: sum(t["caption_noise"] == k for t in truth) for k in CAPTION_NOISE},
        "expected_download_success": sum(t["expected_download"] == "success" for t in truth),
        "expected_bad": sum(bool(t["expected_bad"]) for t in truth),
        "rejected_scene_indices": len(rejected),
        "near_dup_skipped": near_failures,
    }
    meta = {
        "publish_id": publish_id(world, pub),
        "world": world.model_dump(mode="json"),
        "publish": pub.model_dump(mode="json"),
        "guarantees": guarantees,
        "summary": summary,
    }
    listed = [json.loads(t["detail"]) for t in truth if t["planted"] == "blocklisted"]
    if listed:
        lines = ["# known-bad hashes of the planted 'blocklisted' rows (phash of their original, sha256 of "
                 "the bytes served)"]
        for d in listed:
            lines += [f"phash:{d['listed_phash']}", f"sha256:{d['listed_sha256']}"]
        (out_dir / BLOCKLIST_FILE).write_text("\n".join(lines) + "\n")
    (out_dir / "routes.json").write_text(json.dumps(routes, indent=1, sort_keys=True) + "\n")
    (out_dir / "world.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    _write_parquet(
        out_dir / "urls.parquet",
        pd.DataFrame({"path": [t["path"] for t in truth], "caption": [t["alt_text"] for t in truth]}),
        {},
    )
    _write_parquet(out_dir / "truth.parquet", pd.DataFrame(truth), {"guarantees": canonical_json(guarantees)})
    return summary


def _write_parquet(path: Path, df: pd.DataFrame, extra_meta: dict[str, str]) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {k.encode(): v.encode() for k, v in extra_meta.items()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    pq.write_table(table, path, compression="zstd")


def _shuffle_apart(rows: list[dict[str, Any]], rng: np.random.Generator) -> list[int]:
    """A permutation of row indices in which no duplicate sits next to its original."""
    total = len(rows)
    pairs = [(k, r["dup_of"]) for k, r in enumerate(rows) if r["dup_of"] >= 0]
    for _ in range(10_000):
        order = rng.permutation(total)
        where = np.empty(total, dtype=np.int64)
        where[order] = np.arange(total)
        if all(abs(int(where[a]) - int(where[b])) > 1 for a, b in pairs):
            return [int(i) for i in order]
    raise RuntimeError(
        f"could not shuffle {total} rows so that {len(pairs)} duplicates avoid their originals; "
        "lower exact_dup_rate/near_dup_rate"
    )


def read_truth(published_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(published_dir) / "truth.parquet")


def read_guarantees(published_dir: Path) -> dict[str, Any]:
    meta = pq.read_schema(Path(published_dir) / "truth.parquet").metadata or {}
    return json.loads(meta[b"guarantees"])


# The origin recorded for world URLs in ledgers, manifests and shards.  The live server listens on
# whatever port was free, which must not reach the dataset's bytes (same request, same shards);
# ``.invalid`` is reserved (RFC 2606), so a recorded URL never resolves to anybody's host.
WORLD_ORIGIN = "http://world.invalid"


def url_table(published_dir: Path, base_url: str) -> pd.DataFrame:
    """The downloader's input: absolute ``url``, ``caption`` (alt text as published), ``row_id``,
    and ``record_url``: the same URL on :data:`WORLD_ORIGIN`, which is what the ledger keeps."""
    path = Path(published_dir) / "urls.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {published_dir} is not a published world folder")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    urls = pd.read_parquet(path)
    base = base_url.rstrip("/")
    return pd.DataFrame(
        {"url": base + urls["path"], "caption": urls["caption"], "row_id": np.arange(len(urls), dtype=np.int64),
         "record_url": WORLD_ORIGIN + urls["path"]}
    )
