"""Where imported images come from: an image folder, WebDataset tars, a Hugging Face dataset.

Each source lists its input rows as :class:`Row` (metadata only: where the bytes are, caption,
label) and reads one row's raw bytes on demand, so an import never holds the images of a whole
dataset in memory.  Sources check their layout and raise :class:`ImportError_` naming what is
wrong and where; a single unreadable image is not an error here (the importer records it as a
skipped row).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# webdataset member extensions that hold the image, in the order the training loader prefers them
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm")
CAPTION_EXTS = ("txt", "caption", "text")


class ImportError_(ValueError):
    """An input that cannot be imported as asked; the message names the file, column or member."""


@dataclass
class Row:
    """One input row.  ``where`` says in words where it is (a relative path, tar:member, a row index)."""

    row_id: int
    where: str
    caption: str | None = None
    label: str | None = None
    loc: Any = None               # source-specific handle for read()
    extra: dict[str, Any] = field(default_factory=dict)  # source meta kept in the sample's .json


class Source:
    kind = "?"

    def rows(self) -> list[Row]:
        raise NotImplementedError

    def read(self, row: Row) -> bytes:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def classes(self) -> list[str] | None:
        return None


# ------------------------------------------------------------------------------------------ folder


def _read_captions_jsonl(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise ImportError_(f"{path}, line {n}: not JSON ({exc})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or not isinstance(rec.get("caption"), str):
            raise ImportError_(f"{path}, line {n}: expected {{\"file\": RELATIVE_PATH, \"caption\": TEXT}}, got {line[:120]!r}")
        if rec["file"] in out:
            raise ImportError_(f"{path}, line {n}: file {rec['file']!r} has a caption already")
        out[rec["file"]] = rec["caption"]
    return out


class FolderSource(Source):
    """An image folder: class sub-folders become labels (torchvision ImageFolder's rule: the first
    folder level under the root, sorted), captions from ``captions.jsonl`` (``{"file", "caption"}``,
    file relative to the root) or a sidecar ``<image stem>.txt``; neither: the class name or ''."""

    kind = "folder"

    def __init__(self, path: str | Path, *, labels: str = "auto", captions: str | Path | None = None,
                 caption_from_label: bool = True) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise ImportError_(f"image folder {self.root} does not exist or is not a folder")
        self.labels_mode = labels
        self.caption_from_label = caption_from_label
        cap = Path(captions) if captions else self.root / "captions.jsonl"
        if captions and not cap.is_file():
            raise ImportError_(f"captions file {cap} does not exist")
        self.captions_file = cap if cap.is_file() else None
        self._classes: list[str] | None = None

    def rows(self) -> list[Row]:
        files = sorted(p for p in self.root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not files:
            others = sorted(p.name for p in self.root.rglob("*") if p.is_file())[:10]
            raise ImportError_(f"image folder {self.root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} "
                               f"files, recursively); it has {others or 'no files'}")
        rel = [p.relative_to(self.root) for p in files]
        in_sub = [len(r.parts) > 1 for r in rel]
        if self.labels_mode == "subfolders" and not all(in_sub):
            top = [str(r) for r, s in zip(rel, in_sub) if not s][:5]
            raise ImportError_(f"labels='subfolders' but {self.root} has images outside any class folder: {top}")
        use_labels = self.labels_mode == "subfolders" or (self.labels_mode == "auto" and all(in_sub))
        self._classes = sorted({r.parts[0] for r in rel}) if use_labels else None
        jsonl = _read_captions_jsonl(self.captions_file) if self.captions_file else {}
        unknown = sorted(set(jsonl) - {r.as_posix() for r in rel})
        if unknown:
            raise ImportError_(f"{self.captions_file} names {len(unknown)} file(s) that are not images of "
                               f"{self.root}: {unknown[:5]}")
        out = []
        for i, (p, r) in enumerate(zip(files, rel)):
            label = r.parts[0] if use_labels else None
            caption = jsonl.get(r.as_posix())
            if caption is None and p.with_suffix(".txt").is_file():
                caption = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
            if caption is None:
                caption = label.replace("_", " ") if (label and self.caption_from_label) else ""
            out.append(Row(i, r.as_posix(), caption, label, p))
        return out

    def read(self, row: Row) -> bytes:
        return Path(row.loc).read_bytes()

    def classes(self) -> list[str] | None:
        return self._classes

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.root.resolve()), "labels": self.labels_mode,
                "captions_file": str(self.captions_file) if self.captions_file else None}


# ------------------------------------------------------------------------------------------ webdataset


def expand_pattern(pattern: str) -> list[str]:
    """Shard paths/URLs from a list (comma-separated), brace ranges (``{00000..00009}``) and, for
    local paths, globs; a local folder means its ``*.tar`` files (an img2dataset output folder)."""
    from braceexpand import braceexpand

    out: list[str] = []
    for part in [p.strip() for p in pattern.split(",") if p.strip()]:
        for item in braceexpand(part):
            if item.startswith("pipe:"):
                raise ImportError_(f"{item!r}: webdataset 'pipe:' sources run a shell command, which an import does "
                                   "not do; give the shard's http(s) URL or a local path")
            if re.match(r"^[a-z][a-z0-9+.-]*://", item):
                out.append(item)
            elif Path(item).is_dir():
                tars = sorted(p for p in Path(item).glob("*.tar") if not p.name.startswith("."))
                if not tars:
                    raise ImportError_(f"folder {item} holds no .tar shards")
                if any(t.with_suffix(".parquet").is_file() for t in tars):  # an img2dataset output folder
                    from imagegen.stages.shard import read_img2dataset_folder

                    try:  # every tar with its .parquet; a tar without _stats.json is warned about
                        tars = read_img2dataset_folder(item)
                    except (FileNotFoundError, ValueError) as exc:
                        raise ImportError_(str(exc)) from None
                out.extend(str(t) for t in tars)
            elif any(c in item for c in "*?["):
                hits = sorted(glob.glob(item))
                if not hits:
                    raise ImportError_(f"pattern {item!r} matches no file")
                out.extend(hits)
            else:
                if not Path(item).is_file():
                    raise ImportError_(f"shard {item} does not exist")
                out.append(item)
    if not out:
        raise ImportError_(f"shard pattern {pattern!r} names no shard")
    return out


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the member path up to the first dot of its basename."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


class WebDatasetSource(Source):
    """WebDataset tars (an img2dataset output folder, a path/brace/glob pattern, or http(s)/file URLs,
    fetched once into ``fetch_dir``).  Every tar is checked: it must be a tar archive whose members
    group by key into samples with an image member; a sample without one is recorded as skipped."""

    kind = "webdataset"

    def __init__(self, pattern: str, *, fetch_dir: Path | None = None, caption_key: str | None = None,
                 label_field: str | None = None) -> None:
        self.pattern = pattern
        self.urls = expand_pattern(pattern)
        self.fetch_dir = fetch_dir
        self.caption_key = caption_key
        self.label_field = label_field
        self.local: list[Path] = []

    def _fetch(self, url: str) -> Path:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme == "file":
            return Path(urllib.request.url2pathname(parsed.path))
        if parsed.scheme not in ("http", "https"):
            raise ImportError_(f"shard URL {url}: only http(s):// and file:// URLs are read")
        if self.fetch_dir is None:
            raise ImportError_("fetching shard URLs needs a fetch folder")
        from imagegen.hashing import stable_hash

        dest = self.fetch_dir / f"{stable_hash(url)}.tar"
        if not dest.is_file():
            self.fetch_dir.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            try:
                with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
                    while block := resp.read(1 << 20):
                        f.write(block)
                os.replace(tmp, dest)
            except OSError as exc:
                raise ImportError_(f"cannot fetch shard {url}: {exc}") from None
            finally:
                tmp.unlink(missing_ok=True)
        return dest

    def rows(self) -> list[Row]:
        out: list[Row] = []
        self.local = []
        for url in self.urls:
            path = Path(url) if "://" not in url else self._fetch(url)
            self.local.append(path)
            if path.stat().st_size == 0 or not tarfile.is_tarfile(path):
                raise ImportError_(f"{url} is not a tar archive, so not a WebDataset shard")
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            order: list[str] = []
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_member(m.name)
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    samples[key][ext] = (m.offset_data, m.size)
            with_image = [k for k in order if any(e in samples[k] for e in WDS_IMAGE_EXTS)]
            if not with_image:
                exts = sorted({e or "(none)" for s in samples.values() for e in s})[:10]
                raise ImportError_(f"{url} is not a WebDataset shard of images: no sample has an image member "
                                   f"({'/'.join(WDS_IMAGE_EXTS)}); its {len(samples)} member group(s) have "
                                   f"extensions {exts}")
            with open(path, "rb") as f:
                for key in order:
                    members = samples[key]
                    img_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
                    caption, extra = None, {}
                    if "json" in members:
                        try:
                            extra = json.loads(_read_at(f, *members["json"]))
                        except ValueError as exc:
                            raise ImportError_(f"{url}: member {key}.json is not valid JSON ({exc})") from None
                        if not isinstance(extra, dict):
                            extra = {"value": extra}
                    cap_ext = self.caption_key or next((e for e in CAPTION_EXTS if e in members), None)
                    if cap_ext and cap_ext in members:
                        caption = _read_at(f, *members[cap_ext]).decode("utf-8", "replace").strip()
                    elif isinstance(extra.get("caption"), str):
                        caption = extra["caption"]
                    label = None
                    if self.label_field:
                        v = extra.get(self.label_field)
                        if v is None and self.label_field in members:
                            v = _read_at(f, *members[self.label_field]).decode("utf-8", "replace").strip()
                        label = None if v is None else str(v)
                    loc = (len(self.local) - 1, *members[img_ext]) if img_ext else None
                    out.append(Row(len(out), f"{url}:{key}", caption if caption is not None else "", label, loc,
                                   {"source_key": key, "source_shard": url, "source_meta": extra,
                                    "image_member_ext": img_ext}))
        return out

    def read(self, row: Row) -> bytes:
        if row.loc is None:
            raise ImportError_(f"{row.where}: no image member")
        shard, offset, size = row.loc
        with open(self.local[shard], "rb") as f:
            return _read_at(f, offset, size)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "pattern": self.pattern, "shards": self.urls,
                "caption_key": self.caption_key, "label_field": self.label_field}


def _read_at(f: Any, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


# ------------------------------------------------------------------------------------------ Hugging Face


class HFSource(Source):
    """A Hugging Face dataset: a folder written by ``save_to_disk`` (read with ``load_from_disk``), a
    local copy of a dataset repository (its parquet/csv/json/image files, read by ``load_dataset``), or
    a dataset name read by ``load_dataset`` from the user's cache (``HF_DATASETS_OFFLINE=1`` /
    ``HF_HUB_OFFLINE=1`` keep it offline).  The image column may be a ``datasets.Image`` feature (its
    stored bytes are taken as they are) or an array (H, W[, C]) of uint8; the caption and label
    columns are optional, a ``ClassLabel`` label gives its names."""

    kind = "hf"

    def __init__(self, name_or_path: str, *, image_column: str, caption_column: str | None = None,
                 label_column: str | None = None, split: str | None = None, revision: str | None = None,
                 cache_dir: str | None = None) -> None:
        import datasets

        self.spec, self.split, self.revision = name_or_path, split, revision
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        path = Path(name_or_path)
        try:
            if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(path))  # written by save_to_disk
                self.how = "load_from_disk"
            elif path.exists():  # a local copy of a hub dataset repo (parquet/csv/json/image files)
                ds = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
                self.how = "load_dataset(folder)"
            else:
                ds = datasets.load_dataset(name_or_path, split=split, revision=revision, cache_dir=cache_dir)
                self.how = "load_dataset"
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
            raise ImportError_(f"cannot open Hugging Face dataset {name_or_path!r} "
                               f"({type(exc).__name__}: {exc}); give a save_to_disk folder or a dataset name "
                               "in your cache") from None
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise ImportError_(f"Hugging Face dataset {name_or_path!r} has splits {list(ds)}; name one with split=")
            if split not in ds:
                raise ImportError_(f"Hugging Face dataset {name_or_path!r} has no split {split!r}; it has {list(ds)}")
            ds = ds[split]
        cols = list(ds.column_names)
        for role, col in (("image", image_column), ("caption", caption_column), ("label", label_column)):
            if col is not None and col not in cols:
                raise ImportError_(f"Hugging Face dataset {name_or_path!r} has no {role} column {col!r}; "
                                   f"its columns are {cols}")
        feat = ds.features[image_column]
        self.image_feature = type(feat).__name__
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self._names = None
        if label_column is not None and isinstance(ds.features[label_column], datasets.ClassLabel):
            self._names = list(ds.features[label_column].names)
        if getattr(ds, "_indices", None) is not None:  # a select/shuffle view: materialise the row order
            ds = ds.flatten_indices()
        self.ds = ds
        self.fingerprint = getattr(ds, "_fingerprint", None)
        # rows are read straight from the memory-mapped arrow table (no per-row python formatting)
        self._table = ds.data.table if hasattr(ds.data, "table") else ds.data

    def rows(self) -> list[Row]:
        out = []
        n = len(self.ds)
        caps = self._table.column(self.caption_column).to_pylist() if self.caption_column else [None] * n
        labs = self._table.column(self.label_column).to_pylist() if self.label_column else [None] * n
        for i, (caption, label) in enumerate(zip(caps, labs)):
            if label is not None:
                label = self._names[label] if self._names is not None and isinstance(label, int) else str(label)
            if caption is None:
                caption = label.replace("_", " ") if label else ""
            out.append(Row(i, f"{self.spec}[{self.split or ''}]#{i}", str(caption), label, i))
        return out

    def read(self, row: Row) -> bytes:
        value = self._table.column(self.image_column)[int(row.loc)].as_py()
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            if value.get("path"):
                return Path(value["path"]).read_bytes()
            raise ImportError_(f"{row.where}: image column {self.image_column!r} holds neither bytes nor a path")
        return _array_png(value, f"{row.where}: column {self.image_column!r}")

    def classes(self) -> list[str] | None:
        return self._names

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dataset": self.spec, "how": self.how, "split": self.split,
                "revision": self.revision, "image_column": self.image_column, "caption_column": self.caption_column,
                "label_column": self.label_column, "image_feature": self.image_feature,
                "fingerprint": self.fingerprint}


def _array_png(value: Any, where: str) -> bytes:
    """An (H, W) or (H, W, C) array of 0..255 values as PNG bytes (lossless)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(value)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or arr.size == 0:
        raise ImportError_(f"{where}: not an image (array of shape {arr.shape})")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255 or not np.allclose(arr, np.round(arr)):
            raise ImportError_(f"{where}: array values must be integers in 0..255 (got {arr.dtype} in "
                               f"[{arr.min()}, {arr.max()}])")
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


