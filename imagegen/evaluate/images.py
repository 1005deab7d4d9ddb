"""Image folders for evaluation: list, validate, open.

Every metric reads images from a folder; a bad folder must fail before any model runs, with an
error that names the folder or the file.
"""

from __future__ import annotations

import io

from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
Check = Literal["none", "header", "decode"]


class ImageFolderError(ValueError):
    """A folder holds no images, an unreadable image, or images of several sizes."""


def _read_size(path: Path, check: Check) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            if check == "decode":
                im.load()
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFolderError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def list_images(
    folder: str | Path,
    *,
    recursive: bool = False,
    check: Check = "header",
    same_size: bool = False,
) -> list[Path]:
    """The images (``.png .jpg .jpeg .webp``, any case) in ``folder``, sorted by relative path.

    ``check``: ``"header"`` opens every file and reads its size (cheap: no pixel decoding),
    ``"decode"`` decodes every image fully (finds truncated files), ``"none"`` only lists.
    ``same_size=True`` requires one image size and names two files that differ otherwise.
    Hidden files (name starting with ``.``) are skipped.
    """
    root = Path(folder)
    if not root.exists():
        raise ImageFolderError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ImageFolderError(f"{root} is not a folder")
    if same_size and check == "none":
        raise ValueError("same_size=True needs the image sizes: use check='header' or 'decode'")
    entries = root.rglob("*") if recursive else root.iterdir()
    files = sorted(
        (p for p in entries
         if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        hint = ""
        if not recursive and any(p.is_dir() for p in root.iterdir()):
            hint = "; it has subfolders: pass recursive=True to look inside them"
        raise ImageFolderError(
            f"image folder {root} holds no images ({' '.join(IMAGE_SUFFIXES)}){hint}"
        )
    if check == "none":
        return files
    first: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        size = _read_size(path, check)
        if first is None:
            first = (path, size)
        elif same_size and size != first[1]:
            (p0, (w0, h0)), (w1, h1) = first, size
            raise ImageFolderError(
                f"images in {root} differ in size but one size is required: "
                f"{p0.relative_to(root)} is {w0}x{h0}, {path.relative_to(root)} is {w1}x{h1}"
            )
    return files


def open_rgb(path: str | Path) -> Image.Image:
    """An image as RGB with its EXIF orientation applied (as GenEval's evaluator reads it)."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            out = ImageOps.exif_transpose(im)
            return out.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFolderError(f"{p}: not a readable image ({type(exc).__name__}: {exc})") from exc


def image_grid(files: list[Path], columns: int = 8, cell: int = 64) -> bytes:
    """PNG bytes of the images side by side, ``columns`` per row, each scaled to ``cell`` px
    (nearest neighbour: small generated images stay sharp)."""
    if not files:
        raise ValueError("image_grid: no images")
    cols = max(1, min(columns, len(files)))
    rows = -(-len(files) // cols)
    grid = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i, f in enumerate(files):
        with Image.open(f) as im:
            tile = im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        r, c = divmod(i, cols)
        grid.paste(tile, (c * cell, r * cell))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()
