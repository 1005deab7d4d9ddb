"""Dedup stage: perceptual hashes, config validation, and marking on a small synthetic download output."""

from __future__ import annotations

import io
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from imagegen.hashing import bytes_sha256
from imagegen.stages.dedup import DedupConfig, compute_hashes, hash_hex, run_dedup


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A natural-looking picture: a 6x6 random colour grid upsampled bicubically."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    return grid.resize((size, size), Image.BICUBIC)


def jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def reencode(data: bytes, quality: int) -> bytes:
    return jpeg(Image.open(io.BytesIO(data)).convert("RGB"), quality)


def phash_int(data: bytes) -> int:
    return int(str(imagehash.phash(Image.open(io.BytesIO(data)).convert("RGB"))), 16)


def dist(a: bytes, b: bytes) -> int:
    return (phash_int(a) ^ phash_int(b)).bit_count()


# ---------------------------------------------------------------------------- hashing

@pytest.mark.parametrize("hash_type, fn", [("phash", imagehash.phash), ("dhash", imagehash.dhash),
                                           ("ahash", imagehash.average_hash), ("whash", imagehash.whash)])
def test_compute_hashes_matches_imagehash(hash_type: str, fn, tmp_path: Path) -> None:
    blobs = [jpeg(smooth_image(s)) for s in range(6)]
    blobs.append(jpeg(Image.new("RGB", (64, 64), (200, 10, 10))))  # solid colour
    want = [str(fn(Image.open(io.BytesIO(b)).convert("RGB"))) for b in blobs]
    got = compute_hashes(blobs, hash_type)
    assert got.dtype == np.uint64 and hash_hex(got) == want
    paths = []
    for i, b in enumerate(blobs):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(b)
        paths.append(p if i % 2 else str(p))
    assert np.array_equal(compute_hashes(paths, hash_type), got)


def test_parallel_hashes_equal_serial_and_keep_order() -> None:
    blobs = [jpeg(smooth_image(s)) for s in range(41)]
    serial = compute_hashes(blobs, processes=1, chunk_size=4)
    parallel = compute_hashes(iter(blobs), processes=2, chunk_size=4)  # a generator, 11 chunks
    assert np.array_equal(serial, parallel)
    assert len(set(serial.tolist())) == 41
    assert compute_hashes([], processes=2).shape == (0,)


def test_undecodable_image_names_its_position() -> None:
    blobs = [jpeg(smooth_image(s)) for s in range(5)]
    blobs[3] = b"definitely not an image"
    for procs in (1, 2):
        with pytest.raises(ValueError, match=r"image #3 \(23 bytes\) could not be hashed"):
            compute_hashes(blobs, processes=procs, chunk_size=2)


@pytest.mark.parametrize("kwargs, msg", [({"hash_size": 16}, "hash_size must be 8"),
                                         ({"hash_type": "md5"}, "hash_type must be one of"),
                                         ({"processes": 0}, "processes")])
def test_compute_hashes_refuses_bad_options(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        compute_hashes([jpeg(smooth_image(0))], **kwargs)


def test_transformed_image_stays_close_unrelated_stays_far() -> None:
    originals = [jpeg(smooth_image(s)) for s in range(12)]
    moved = []
    for data in originals:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        moved.append(dist(data, reencode(data, 60)))
        moved.append(dist(data, jpeg(img.resize((48, 48), Image.BILINEAR).resize((64, 64), Image.BICUBIC))))
        moved.append(dist(data, jpeg(img.resize((128, 128), Image.BICUBIC))))
    unrelated = [dist(originals[i], originals[j]) for i in range(12) for j in range(i)]
    assert max(moved) <= 6 and np.mean(moved) <= 3, moved
    assert min(unrelated) >= 12 and np.mean(unrelated) >= 24, unrelated


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("bad", [{"radius": 17}, {"radius": -1}, {"hash_type": "md5"}, {"processes": 0},
                                 {"keep_rule": "random"}, {"colour": "red"}])
def test_config_refuses_bad_values(bad: dict) -> None:
    with pytest.raises(ValidationError):
        DedupConfig(**bad)


# ---------------------------------------------------------------------------- the stage

# key -> (source, original size); sources: A/B/C/D distinct pictures, "=X" byte copy, "~X" re-encoded
ROWS = {
    "000000000": ("A", (100, 100)),
    "000000001": ("B", (200, 200)),
    "000000002": ("=A", (300, 300)),  # largest original: represents A's cluster although not the first key
    "000000003": ("~A", (50, 50)),
    "000000004": ("C", (64, 64)),
    "000000005": ("=C", (64, 64)),  # area tie with 004: smallest key (004) represents
    "000000006": ("D", (80, 80)),
    "000000007": ("~B", (200, 200)),  # area tie with 001: 001 represents
    "000000009": ("~=A", (10, 10)),  # byte copy of 003 (re-encoded A)
}
SEEDS = {"A": 1, "B": 2, "C": 3, "D": 5}


def build_download_output(root: Path, order_seed: int | None = None) -> tuple[Path, Path, dict[str, bytes]]:
    originals = {name: jpeg(smooth_image(seed)) for name, seed in SEEDS.items()}
    blobs: dict[str, bytes] = {}
    for key, (src, _) in ROWS.items():
        if src == "~=A":
            blobs[key] = blobs["000000003"]
        elif src.startswith("="):
            blobs[key] = originals[src[1:]]
        elif src.startswith("~"):
            blobs[key] = reencode(originals[src[1:]], 60)
        else:
            blobs[key] = originals[src]
    keys = list(ROWS)
    if order_seed is not None:
        keys = [keys[i] for i in np.random.default_rng(order_seed).permutation(len(keys))]
    images = root / "images"
    images.mkdir(parents=True)
    schema = pa.schema([("key", pa.string()), ("row_id", pa.int64()), ("image", pa.binary()),
                        ("ext", pa.string()), ("sha256", pa.string())])
    for part, chunk in enumerate([keys[:5], keys[5:]]):
        pq.write_table(pa.table({"key": chunk, "row_id": [int(k) for k in chunk],
                                 "image": [blobs[k] for k in chunk], "ext": ["jpg"] * len(chunk),
                                 "sha256": [bytes_sha256(blobs[k]) for k in chunk]}, schema=schema),
                       images / f"part-{part:05d}.parquet", row_group_size=2)
    ledger = pd.DataFrame({
        "row_id": [int(k) for k in ROWS] + [8, 10],
        "key": list(ROWS) + [None, None],
        "status": ["success"] * len(ROWS) + ["failed", "skipped"],
        "original_width": [w for _, (w, _) in ROWS.values()] + [None, None],
        "original_height": [h for _, (_, h) in ROWS.values()] + [None, None],
    })
    ledger.to_parquet(root / "ledger.parquet", index=False)
    return images, root / "ledger.parquet", blobs


def test_run_dedup_marks_exactly_the_right_rows(tmp_path: Path) -> None:
    images, ledger, blobs = build_download_output(tmp_path)
    # preconditions on the synthetic pictures, so a failure below is about dedup, not about the data
    assert dist(blobs["000000000"], blobs["000000003"]) <= 6
    assert dist(blobs["000000001"], blobs["000000007"]) <= 6
    distinct = ["000000000", "000000001", "000000004", "000000006"]
    assert min(dist(blobs[a], blobs[b]) for a in distinct for b in distinct if a < b) > 12

    cfg = DedupConfig(radius=6, batch_rows=2)
    out = tmp_path / "dedup" / "dedup.parquet"
    counts = run_dedup(images, ledger, cfg, out)
    df = pd.read_parquet(out).set_index("key")
    assert list(df.index) == sorted(ROWS)
    expect = {  # key: (near_cluster, representative?, duplicate_of, dup_kind, exact_cluster)
        "000000000": ("000000000", False, "000000002", "exact", "000000000"),
        "000000001": ("000000001", True, None, "unique", "000000001"),
        "000000002": ("000000000", True, None, "unique", "000000000"),
        "000000003": ("000000000", False, "000000002", "near", "000000003"),
        "000000004": ("000000004", True, None, "unique", "000000004"),
        "000000005": ("000000004", False, "000000004", "exact", "000000004"),
        "000000006": ("000000006", True, None, "unique", "000000006"),
        "000000007": ("000000001", False, "000000001", "near", "000000007"),
        "000000009": ("000000000", False, "000000002", "near", "000000003"),
    }
    for key, (near, rep, dup_of, kind, exact) in expect.items():
        row = df.loc[key]
        got = (row.near_cluster, bool(row.is_representative), row.duplicate_of, row.dup_kind, row.exact_cluster)
        assert got == (near, rep, dup_of, kind, exact), key
        assert row.sha256 == bytes_sha256(blobs[key]) and row.row_id == int(key)
        assert row.phash == str(imagehash.phash(Image.open(io.BytesIO(blobs[key])).convert("RGB")))
        rep_key = dup_of or key
        assert row.min_distance_to_rep == dist(blobs[key], blobs[rep_key])
    assert df["cluster_size"].to_dict() == {"000000000": 4, "000000001": 2, "000000002": 4, "000000003": 4,
                                           "000000004": 2, "000000005": 2, "000000006": 1, "000000007": 2,
                                           "000000009": 4}
    assert counts["images"] == 9 and counts["exact_groups"] == 3 and counts["near_groups"] == 3
    assert counts["marked_duplicates"] == 5 and counts["exact_duplicates"] == 2 and counts["near_duplicates"] == 3
    assert counts["representatives"] == 4 and counts["unique_sha256"] == 6


def test_run_dedup_is_deterministic_across_input_order_and_processes(tmp_path: Path) -> None:
    a_images, a_ledger, _ = build_download_output(tmp_path / "a")
    b_images, b_ledger, _ = build_download_output(tmp_path / "b", order_seed=3)
    run_dedup(a_images, a_ledger, DedupConfig(radius=6), tmp_path / "a.parquet")
    run_dedup(b_images, b_ledger, DedupConfig(radius=6, processes=2, batch_rows=1), tmp_path / "b.parquet")
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_run_dedup_radius_zero_groups_equal_hashes_only(tmp_path: Path) -> None:
    images, ledger, blobs = build_download_output(tmp_path)
    run_dedup(images, ledger, DedupConfig(radius=0), tmp_path / "out.parquet")
    df = pd.read_parquet(tmp_path / "out.parquet").set_index("key")
    assert df.loc["000000000", "duplicate_of"] == "000000002" and df.loc["000000000", "dup_kind"] == "exact"
    assert df.loc["000000005", "duplicate_of"] == "000000004"
    for a, b, rep in [("000000000", "000000003", "000000002"), ("000000001", "000000007", "000000001")]:
        if dist(blobs[a], blobs[b]) == 0:  # re-encoding did not move the hash: still one cluster
            assert df.loc[b, "duplicate_of"] == rep and df.loc[b, "dup_kind"] == "near"
        else:
            assert df.loc[b, "near_cluster"] != df.loc[a, "near_cluster"]
            assert bool(df.loc[b, "is_representative"]) and df.loc[b, "duplicate_of"] is None
    # the re-encoded copy of A and its byte copy stay together whatever the radius
    assert df.loc["000000009", "near_cluster"] == df.loc["000000003", "near_cluster"]
    assert (df["min_distance_to_rep"] == 0).all()


def test_run_dedup_refuses_inconsistent_inputs(tmp_path: Path) -> None:
    images, ledger, _ = build_download_output(tmp_path)
    cfg = DedupConfig()
    led = pd.read_parquet(ledger)
    led.loc[led["key"] == "000000004", "status"] = "failed"
    led.to_parquet(tmp_path / "bad_ledger.parquet", index=False)
    with pytest.raises(ValueError, match=r"1 image\(s\) have no 'success' row in the ledger .*000000004"):
        run_dedup(images, tmp_path / "bad_ledger.parquet", cfg, tmp_path / "o.parquet")
    led = pd.read_parquet(ledger).drop(columns=["original_width"])
    led.to_parquet(tmp_path / "no_width.parquet", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['original_width'\]"):
        run_dedup(images, tmp_path / "no_width.parquet", cfg, tmp_path / "o.parquet")
    with pytest.raises(FileNotFoundError, match="no part-"):
        run_dedup(tmp_path / "nowhere", ledger, cfg, tmp_path / "o.parquet")
    # a download folder's per-part ledger is read where it is: its errors name that folder
    from imagegen.stages.ledger import write_ledger

    led = pd.read_parquet(ledger)
    led.loc[led["key"] == "000000004", "original_width"] = None
    write_ledger(tmp_path / "dl", led, rows_per_file=3)
    with pytest.raises(ValueError, match=rf"ledger {tmp_path / 'dl' / 'ledger'}: 1 success row\(s\) lack key"):
        run_dedup(images, tmp_path / "dl", cfg, tmp_path / "o.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no download ledger in {tmp_path / 'empty'}"):
        run_dedup(images, tmp_path / "empty", cfg, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()
    write_ledger(tmp_path / "dl", pd.read_parquet(ledger), rows_per_file=3)
    run_dedup(images, tmp_path / "dl", cfg, tmp_path / "parts.parquet")  # the same marks as the one file
    run_dedup(images, ledger, cfg, tmp_path / "one.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "parts.parquet"), pd.read_parquet(tmp_path / "one.parquet"))


def test_run_dedup_on_an_empty_download(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    schema = pa.schema([("key", pa.string()), ("row_id", pa.int64()), ("image", pa.binary()), ("sha256", pa.string())])
    pq.write_table(schema.empty_table(), images / "part-00000.parquet")  # what download writes with no successes
    pd.DataFrame({"row_id": [0], "key": [None], "status": ["failed"], "original_width": [None],
                  "original_height": [None]}).to_parquet(tmp_path / "ledger.parquet", index=False)
    counts = run_dedup(images, tmp_path / "ledger.parquet", DedupConfig(), tmp_path / "out.parquet")
    assert counts["images"] == 0 and counts["marked_duplicates"] == 0
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 0
