"""Shard stage: reproducible bytes, seeded shuffle, tar metadata, img2dataset layout, bad input."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from imagegen.hashing import file_sha256
from imagegen.stages.shard import (
    ShardConfig,
    plan_shards,
    read_img2dataset_folder,
    write_shards,
    write_shards_from_plan,
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations


def encode(i: int, fmt: str = "JPEG", size: int = 12) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_samples(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        png = i % 3 == 0
        out.append({"key": f"{i:06d}", "image": encode(i, "PNG" if png else "JPEG"), "ext": "png" if png else "jpg",
                    "caption": f"a photo number {i} — é ü 漢", "meta": {"row_id": i, "score": i / 7,
                    "src": {"w": 12, "h": 12}, "tags": ["a", "b"], "np": np.int64(i), "nan": float("nan")}})
    return out


def tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".txt")]


def all_keys(out_dir: Path) -> list[str]:
    return [k for tar in sorted(out_dir.glob("*.tar")) for k in tar_keys(tar)]


# ---------------------------------------------------------------------------------------------- plan


def test_plan_is_seeded_permutation_cut_into_shards():
    keys = [f"{i:05d}" for i in range(103)]
    plan = plan_shards(keys, ShardConfig(target_shard_size=10, shuffle_seed=3))
    assert [len(c) for c in plan] == [10] * 10 + [3]
    flat = [k for c in plan for k in c]
    assert sorted(flat) == keys
    assert flat != keys, "keys were not shuffled"
    assert plan == plan_shards(keys, ShardConfig(target_shard_size=10, shuffle_seed=3))
    assert plan == plan_shards(list(reversed(keys)), ShardConfig(target_shard_size=10, shuffle_seed=3)), \
        "order must depend on the key set and seed only, not on the input order"
    other = [k for c in plan_shards(keys, ShardConfig(target_shard_size=10, shuffle_seed=4)) for k in c]
    assert other != flat


@pytest.mark.parametrize("bad, match", [
    (["a", "a"], "duplicate"), (["a.b"], "contains '.'"), (["x/y"], "contains"), ([""], "empty"),
    (["__key__"], "reserves"), ([3], "must be str"), ([], "empty"),
])
def test_plan_refuses_bad_keys(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        plan_shards(bad)


@pytest.mark.parametrize("kwargs", [
    {"target_shard_size": 0}, {"image_ext": "gif"}, {"name_prefix": "a/b"}, {"max_shard_bytes": 100},
    {"shuffle_seed": -1}, {"unknown": 1},
])
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ValidationError):
        ShardConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- write


def test_shards_are_bit_reproducible_and_shuffled(tmp_path):
    samples = make_samples(45)
    cfg = ShardConfig(target_shard_size=10, shuffle_seed=1)
    a = write_shards(samples, tmp_path / "a", cfg)
    b = write_shards(list(reversed(samples)), tmp_path / "b", cfg)
    assert [i.count for i in a] == [10, 10, 10, 10, 5]
    assert a == b
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for info in a:
        path = tmp_path / "a" / info.name
        assert info.sha256 == file_sha256(path) and info.bytes == path.stat().st_size
    order = all_keys(tmp_path / "a")
    assert sorted(order) == [s["key"] for s in samples] and order != [s["key"] for s in samples]
    c = write_shards(samples, tmp_path / "c", ShardConfig(target_shard_size=10, shuffle_seed=2))
    assert [i.sha256 for i in c] != [i.sha256 for i in a]
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


def test_tar_members_have_fixed_metadata_and_roundtrip(tmp_path):
    samples = {s["key"]: s for s in make_samples(12)}
    plan = plan_shards(samples, ShardConfig(target_shard_size=12))
    write_shards_from_plan(plan, samples.__getitem__, tmp_path)
    with tarfile.open(tmp_path / "00000.tar") as tf:
        members = tf.getmembers()
        assert len(members) == 36
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.isreg()) == (0, 0, 0, "", "", 0o644, True)
        for i, key in enumerate(plan[0]):
            s = samples[key]
            names = [m.name for m in members[3 * i:3 * i + 3]]
            assert names == [f"{key}.{s['ext']}", f"{key}.txt", f"{key}.json"]
            assert tf.extractfile(names[0]).read() == s["image"]
            assert tf.extractfile(names[1]).read().decode("utf-8") == s["caption"]
            meta = json.loads(tf.extractfile(names[2]).read())
            assert meta["np"] == int(key) and meta["nan"] is None and meta["src"] == {"w": 12, "h": 12}


def test_parquet_and_stats(tmp_path):
    samples = make_samples(7)
    samples[0]["meta"]["caption"] = "an older caption"
    write_shards(samples, tmp_path, ShardConfig(target_shard_size=100))
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.column_names[:2] == ["key", "caption"]
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {s["key"] for s in samples}
    r0 = rows[samples[0]["key"]]
    assert r0["caption"] == samples[0]["caption"] and r0["meta.caption"] == "an older caption"
    assert r0["row_id"] == 0 and r0["src.w"] == 12 and r0["np"] == 0 and r0["nan"] is None
    assert "tags" not in table.column_names, "lists stay in the .json only"
    assert str(table.schema.field("row_id").type) == "int64"
    assert str(table.schema.field("score").type) == "double"
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 7


def test_max_shard_bytes_splits_shards(tmp_path):
    samples = make_samples(30)
    infos = write_shards(samples, tmp_path, ShardConfig(target_shard_size=20, max_shard_bytes=20_480))
    assert len(infos) > 2 and sum(i.count for i in infos) == 30
    assert all(i.bytes <= 20_480 for i in infos)
    assert [i.name for i in infos] == [f"{n:05d}.tar" for n in range(len(infos))]
    plan = plan_shards([s["key"] for s in samples], ShardConfig(target_shard_size=20))
    assert all_keys(tmp_path) == [k for c in plan for k in c], "splitting must keep plan order"


def test_name_prefix_and_ext_follow_input(tmp_path):
    samples = make_samples(4)
    infos = write_shards(samples, tmp_path, ShardConfig(name_prefix="train-"))
    assert [i.name for i in infos] == ["train-00000.tar"]
    assert {p.name for p in tmp_path.iterdir()} == {"train-00000.tar", "train-00000.parquet",
                                                   "train-00000_stats.json"}
    with tarfile.open(tmp_path / "train-00000.tar") as tf:
        exts = {m.name.split(".", 1)[1] for m in tf.getmembers()}
    assert exts == {"jpg", "png", "txt", "json"}


@pytest.mark.parametrize("change, match", [
    ({"ext": "gif"}, "ext must be one of"),
    ({"image": b"not an image at all"}, "signature"),
    ({"caption": None}, "caption must be str"),
    ({"meta": {"x": {1, 2}}}, r"meta\.x: set"),
    ({"meta": {"x": object()}}, "not JSON-serialisable"),
    ({"meta": {"a": {"b": 1}, "a.b": 2}}, "appears twice"),
    ({"image": "text"}, "image must be bytes"),
])
def test_bad_samples_are_refused_with_key(tmp_path, change, match):
    samples = make_samples(3)
    samples[1].update(change)
    with pytest.raises((ValueError, TypeError), match=match) as err:
        write_shards(samples, tmp_path)
    assert samples[1]["key"] in str(err.value)
    assert not list(tmp_path.iterdir()), "a failed shard must leave no file behind"


def test_image_ext_config_must_match(tmp_path):
    with pytest.raises(ValueError, match="image_ext='jpg'"):
        write_shards(make_samples(3), tmp_path, ShardConfig(image_ext="jpg"))


def test_failure_midway_keeps_finished_shards_only(tmp_path):
    samples = {s["key"]: s for s in make_samples(10)}
    plan = plan_shards(samples, ShardConfig(target_shard_size=4))
    victim = plan[1][2]

    def get(key):
        if key == victim:
            raise OSError("disk went away")
        return samples[key]

    with pytest.raises(OSError, match="disk went away"):
        write_shards_from_plan(plan, get, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_wrong_key_from_get_sample_and_existing_output(tmp_path):
    samples = make_samples(3)
    plan = plan_shards([s["key"] for s in samples])
    with pytest.raises(ValueError, match="returned a sample with key"):
        write_shards_from_plan(plan, lambda k: samples[0] if k != samples[0]["key"] else samples[1], tmp_path / "x")
    write_shards(samples, tmp_path / "y")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards(samples, tmp_path / "y")
    infos = write_shards(samples[:2], tmp_path / "y", overwrite=True)
    assert sorted(all_keys(tmp_path / "y")) == sorted(s["key"] for s in samples[:2]) and len(infos) == 1


# ---------------------------------------------------------------------------------------------- img2dataset


def write_img2dataset_reference(folder: Path, samples: list[dict]) -> None:
    """One shard written by img2dataset's own writer and stats function."""
    import pyarrow as pa
    from img2dataset.logger import CappedCounter, write_stats
    from img2dataset.writer import WebDatasetSampleWriter

    folder.mkdir()
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string())])
    writer = WebDatasetSampleWriter(0, str(folder), True, 5, schema, "jpg")
    for s in samples:
        writer.write(s["image"], s["key"], s["caption"],
                     {"url": f"http://x/{s['key']}", "caption": s["caption"], "key": s["key"], "status": "success"})
    writer.close()
    counter = CappedCounter()
    counter.increment("success")
    write_stats(str(folder), 0, len(samples), len(samples), 0, 0, 1.0, 2.0, counter, 5)


def test_layout_matches_img2dataset_writer(tmp_path):
    samples = [s for s in make_samples(6) if s["ext"] == "jpg"]
    write_img2dataset_reference(tmp_path / "ref", samples)
    write_shards(samples, tmp_path / "ours")
    ref_files = {p.name for p in (tmp_path / "ref").iterdir()}
    assert ref_files == {p.name for p in (tmp_path / "ours").iterdir()} == {
        "00000.tar", "00000.parquet", "00000_stats.json"}
    ref_stats = json.loads((tmp_path / "ref" / "00000_stats.json").read_text())
    our_stats = json.loads((tmp_path / "ours" / "00000_stats.json").read_text())
    assert set(ref_stats) <= set(our_stats), "img2dataset's logger reads every key it writes"
    assert our_stats["count"] == ref_stats["count"] and our_stats["successes"] == ref_stats["successes"]
    with tarfile.open(tmp_path / "ref" / "00000.tar") as ref, tarfile.open(tmp_path / "ours" / "00000.tar") as ours:
        # img2dataset (via wds.TarWriter) orders a sample's members by name: jpg, json, txt; ours
        # are jpg, txt, json as specified.  Readers group by key, so only the member set matters.
        def members(tf):
            out: dict[str, set[str]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, set()).add(ext)
            return out
        assert members(ref) == members(ours) == {s["key"]: {"jpg", "txt", "json"} for s in samples}
    ref_cols = set(pq.read_table(tmp_path / "ref" / "00000.parquet").column_names)
    our_cols = set(pq.read_table(tmp_path / "ours" / "00000.parquet").column_names)
    assert {"key", "caption"} <= ref_cols & our_cols
    assert read_img2dataset_folder(tmp_path / "ref") == [tmp_path / "ref" / "00000.tar"]
    assert read_img2dataset_folder(tmp_path / "ours") == [tmp_path / "ours" / "00000.tar"]
    # shards brought in from img2dataset are read by the training loader like ours
    from imagegen.loader import make_dataset
    got = {s["key"]: s["caption"] for s in make_dataset(read_img2dataset_folder(tmp_path / "ref"))}
    assert got == {s["key"]: s["caption"] for s in samples}


def test_read_img2dataset_folder_validates(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_img2dataset_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        read_img2dataset_folder(tmp_path / "empty")
    write_shards(make_samples(8), tmp_path / "d", ShardConfig(target_shard_size=3))
    (tmp_path / "d" / "00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"00001\.tar"):
        read_img2dataset_folder(tmp_path / "d")
    write_shards(make_samples(8), tmp_path / "e", ShardConfig(target_shard_size=3))
    (tmp_path / "e" / "00002_stats.json").unlink()
    with pytest.warns(UserWarning, match="00002.tar"):
        assert len(read_img2dataset_folder(tmp_path / "e")) == 3
    (tmp_path / "e" / "00000.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="00000.tar"):
        read_img2dataset_folder(tmp_path / "e")


def test_long_and_non_ascii_keys_use_pax_headers_reproducibly(tmp_path):
    image = encode(0, "PNG")
    samples = [{"key": k, "image": image, "ext": "png", "caption": "c", "meta": {}}
               for k in ("café-1", "k" * 150, "plain")]
    a = write_shards(samples, tmp_path / "a")
    assert a == write_shards(samples, tmp_path / "b")
    with tarfile.open(tmp_path / "a" / "00000.tar") as tf:
        names = {m.name.split(".")[0] for m in tf.getmembers()}
    assert names == {"café-1", "k" * 150, "plain"}


# ---------------------------------------------------------------------------------------------- the shard stage

def _stage_chain_download(d: Path, n_parts: int = 3, per_part: int = 14) -> int:
    """A download-stage folder: image parts in key order plus a full ledger with failed and skipped rows."""
    import pandas as pd
    import pyarrow as pa

    from imagegen.hashing import bytes_sha256
    from imagegen.stages.download import IMAGE_SCHEMA, LEDGER_COLUMNS
    from imagegen.stages.ledger import write_ledger

    (d / "images").mkdir(parents=True)
    led = []
    rid = 0
    for p in range(n_parts):
        cols = {n: [] for n in IMAGE_SCHEMA.names}
        for i in range(per_part):
            rid += 1
            if rid % 9 == 0:  # a failed and a skipped row now and then: every input row is accounted for
                led.append({"row_id": rid, "url": f"http://x.invalid/{rid}", "caption": f"row {rid}",
                            "status": "failed" if rid % 2 else "skipped", "reason": "http_404" if rid % 2 else
                            "bad_url", "attempts": 1})
                continue
            side = 20 + rid % 9  # sizes differ, so tar sizes differ
            blob = encode(rid if rid % 11 else rid - 1, size=side)  # some exact duplicates
            key = f"{rid:09d}"
            for n, v in (("key", key), ("row_id", rid), ("image", blob), ("ext", "jpg"),
                         ("sha256", bytes_sha256(blob)), ("width", side), ("height", side),
                         ("caption", f"a photo number {rid}")):
                cols[n].append(v)
            led.append({"row_id": rid, "url": f"http://x.invalid/{rid}", "caption": f"a photo number {rid}",
                        "status": "success", "attempts": 1, "key": key, "original_width": side,
                        "original_height": side, "original_mode": "RGB", "original_format": "JPEG",
                        "exif_transposed": False, "width": side, "height": side,
                        "source_sha256": bytes_sha256(blob), "sha256": bytes_sha256(blob)})
        pq.write_table(pa.table(cols, schema=IMAGE_SCHEMA), d / "images" / f"part-{p:05d}.parquet", row_group_size=5)
    ledger = pd.DataFrame(led, columns=LEDGER_COLUMNS)
    for col in ("attempts", "original_width", "original_height", "width", "height"):
        ledger[col] = ledger[col].astype("Int64")
    ledger["exif_transposed"] = ledger["exif_transposed"].astype("boolean")
    write_ledger(d, ledger, rows_per_file=10)  # the ledger as part files, as the download stage writes it
    (d / "card.json").write_text(json.dumps({"stage": "download", "id": d.name, "counts": {}}))
    return len(ledger)


@pytest.fixture(scope="module")
def stage_chain(tmp_path_factory):
    """Real dedup, filter and recaption stage outputs over a small download folder (no CLIP, no world):
    what the shard stage reads.  Returns (root, download, dedup, filter, recaption results, input rows)."""
    from imagegen import curate as C
    from imagegen.stages.dedup import DedupConfig
    from imagegen.stages.filter import FilterConfig
    from imagegen.stages.recaption import RecaptionConfig

    root = tmp_path_factory.mktemp("chain")
    d = root / "stages" / "download" / "fixture"
    n_rows = _stage_chain_download(d)
    dl = C.StageResult("download", "fixture", str(d))
    dd = C.dedup_stage(root, dl, DedupConfig(runner="local:1"))
    ff = C.filter_stage(root, dl, dd, FilterConfig(clip_score=None, min_side=8, runner="local:1"), None)
    rc = C.recaption_stage(root, dl, ff, RecaptionConfig(policy="keep_both"), None)
    return root, dl, dd, ff, rc, n_rows


def _shard(stage_chain, root: Path | None = None, runner: str = "local:1", **shard) -> "object":
    from imagegen import curate as C
    from imagegen.registry import get_dataset

    root0, dl, dd, ff, rc, _ = stage_chain
    root = root or root0
    cfg = C.CurateConfig(name="chain", shard=ShardConfig(**shard), runner=runner)
    res = C.shard_stage(root, "chain", cfg, dl, dd, ff, rc, None, None)
    return get_dataset(root, res.id)


def _tar_of_key(folder: Path) -> dict[str, str]:
    return {k: tar.name for tar in sorted(folder.glob("*.tar")) for k in tar_keys(tar)}


def test_manifest_names_the_tar_that_holds_each_key_when_max_shard_bytes_splits(stage_chain, tmp_path):
    import pandas as pd

    ref = _shard(stage_chain, tmp_path / "root", target_shard_size=10, max_shard_bytes=10_240)
    shards = ref.path / "shards"
    man = pd.read_parquet(ref.path / "manifest.parquet")
    n_kept = len(man)
    planned = -(-n_kept // 10)
    assert len(ref.card["shards"]) > planned, "the cap must really split planned shards"
    assert [s["name"] for s in ref.card["shards"]] == [f"{i:05d}.tar" for i in range(len(ref.card["shards"]))]
    assert all(s["bytes"] <= 10_240 for s in ref.card["shards"])
    assert dict(zip(man["key"], man["shard"])) == _tar_of_key(shards)
    assert sum(s["count"] for s in ref.card["shards"]) == n_kept


def test_every_row_dropped_is_refused_with_where_to_read_the_outcomes(stage_chain):
    import re

    import pandas as pd

    from imagegen import curate as C
    from imagegen.stages.filter import FilterConfig
    from imagegen.stages.recaption import RecaptionConfig

    root, dl, dd, _, _, n_rows = stage_chain
    ff = C.filter_stage(root, dl, dd, FilterConfig(clip_score=None, min_side=10_000, runner="local:1"), None)
    rc = C.recaption_stage(root, dl, ff, RecaptionConfig(), None)
    cfg = C.CurateConfig(name="none-left", shard=ShardConfig(target_shard_size=10))
    with pytest.raises(ValueError, match=f"none of the {n_rows} input rows survived") as err:
        C.shard_stage(root, "none-left", cfg, dl, dd, ff, rc, None, None)
    msg = str(err.value)
    acc_path, led_path = (Path(m) for m in re.findall(r"in (/\S+\.parquet)", msg))
    assert acc_path.name == "accounting.parquet" and led_path.name == "ledger.parquet"
    assert acc_path.parent.parent == root / "failed"
    acc = pd.read_parquet(acc_path)
    assert len(acc) == n_rows and "kept" not in set(acc["outcome"])
    assert acc["outcome"].str.startswith(("filtered:", "download_failed:", "skipped:")).all()
    assert len(pd.read_parquet(led_path)) == n_rows
    assert not (root / "datasets" / acc_path.parent.name).exists(), "an empty dataset is not a dataset"


def test_part_parallel_shards_equal_the_one_process_writer(stage_chain, tmp_path):
    """Each planned shard written by its own map step on a 2-process pool: the same tars (names, bytes),
    parquet and stats files, manifest and accounting as in one process, and as the one-process writer
    (write_shards_from_plan) fed the same samples."""
    import pandas as pd

    from imagegen.stages.shard_parts import _meta_of

    root, dl, *_ = stage_chain
    cfg = dict(target_shard_size=6, max_shard_bytes=12_288, shuffle_seed=5, name_prefix="w-")
    one = _shard(stage_chain, tmp_path / "one", "local:1", **cfg)
    two = _shard(stage_chain, tmp_path / "two", "local:2", **cfg)
    assert one.id == two.id and one.card["shards"] == two.card["shards"]
    files = sorted(p.name for p in (one.path / "shards").iterdir())
    assert files == sorted(p.name for p in (two.path / "shards").iterdir())
    assert len(files) == 3 * len(one.card["shards"]) and not [f for f in files if f.startswith(".")]
    for f in files:
        assert (one.path / "shards" / f).read_bytes() == (two.path / "shards" / f).read_bytes(), f
    for what in ("manifest", "accounting"):
        pd.testing.assert_frame_equal(pd.read_parquet(one.path / f"{what}.parquet"),
                                      pd.read_parquet(two.path / f"{what}.parquet"))
    assert (one.path / "samples.png").read_bytes() == (two.path / "samples.png").read_bytes()
    assert not (one.path / "_work").exists() and not (two.path / "_work").exists()
    for r in ("one", "two"):  # the tasks' work folder is gone once the dataset is complete
        assert list((tmp_path / r / "parts" / "shard").iterdir()) == []
    # the reference: the one-process writer over the same samples (images from the download parts)
    man = pd.read_parquet(one.path / "manifest.parquet")
    images = {r["key"]: (r["image"], r["ext"]) for part in sorted((Path(dl.path) / "images").glob("*.parquet"))
              for r in pq.read_table(part, columns=["key", "image", "ext"]).to_pylist()}
    rows = {r["key"]: r for r in man.to_dict("records")}
    scores = [c for c in man.columns if c.endswith("_score")]

    def get(key):
        return {"key": key, "image": images[key][0], "ext": images[key][1], "caption": rows[key]["caption"],
                "meta": _meta_of(rows[key], scores)}

    scfg = ShardConfig(**cfg)
    ref = write_shards_from_plan(plan_shards(man["key"], scfg), get, tmp_path / "ref", scfg)
    assert [i.model_dump() for i in ref] == one.card["shards"]
    assert dict(zip(man["key"], man["shard"])) == _tar_of_key(one.path / "shards")


def test_a_failed_shard_stage_reruns_only_the_tasks_whose_output_is_missing(stage_chain, tmp_path):
    """The shard tasks' outputs live in ``<root>/parts/shard/<stage id>``: a stage that failed after its
    tasks finished (here: the dataset folder could not be written) keeps them; with one shard-write output
    deleted, the rerun of the stage runs that one task again, reuses every other task's files (the same
    inodes end up in the dataset: hard links, nothing rewritten) and ends on the bytes of a clean run."""
    import pandas as pd

    from imagegen import curate as C
    from imagegen.stages import shard_parts as SP
    from imagegen.stages.ledger import read_ledger

    _, dl, dd, ff, rc, _ = stage_chain
    shard = dict(target_shard_size=4, shuffle_seed=3)
    clean = _shard(stage_chain, tmp_path / "clean", "local:1", **shard)
    root = tmp_path / "root"
    cfg = C.CurateConfig(name="chain", shard=ShardConfig(**shard), runner="local:2")
    inputs = {"download": dl.id, "dedup": dd.id, "filter": ff.id, "recaption": rc.id}
    work = root / "parts" / "shard" / C.stage_id("shard", inputs, C._params("shard", cfg.shard), C.stage_code("shard"))
    # what the stage's body computes before the tasks, then the tasks, then a failure placing the tars
    ledger = read_ledger(Path(dl.path), ["row_id", "url", "key", "status", "reason", "original_width",
                                         "original_height", "sha256", "source_sha256"])
    f = pd.read_parquet(Path(ff.path) / "filter.parquet")
    kept = f.loc[f["keep"], "key"].tolist()
    table, scores = SP.metadata_table(ledger, pd.read_parquet(Path(dd.path) / "dedup.parquet"), f,
                                      pd.read_parquet(Path(rc.path) / "captions.parquet"), kept)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(FileExistsError):
        SP.write_dataset_shards(Path(dl.path) / "images", table, scores, cfg.shard, blocker, work, "local:2",
                                kept[:16])
    done = sorted((work / "tars").glob("*.done.json"))
    n = len(done)
    assert n == len(clean.card["shards"]) >= 5 and len(list((work / "route").glob("*.done.json"))) == 3
    tars = sorted((work / "tars").glob("*.tar"))
    victim = tars[2]
    inode = {p.name: p.stat().st_ino for p in tars if p != victim}
    victim.unlink()

    res = C.shard_stage(root, "chain", cfg, dl, dd, ff, rc, None, None)
    tasks = res.counts["shard"]["tasks"]
    assert tasks == {"route": {"run": 0, "reused": 3}, "write": {"run": 1, "reused": n - 1}}
    out = Path(res.path) / "shards"
    assert res.id == clean.id
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (clean.path / "shards").iterdir())
    for p in out.iterdir():
        assert p.read_bytes() == (clean.path / "shards" / p.name).read_bytes(), p.name
    # planned shard i is tar i here (no max_shard_bytes): the reused tars are the very files of the failed run
    reused = {f"{int(name[:5]):05d}.tar": ino for name, ino in inode.items()}
    assert {p.name: p.stat().st_ino for p in out.glob("*.tar") if p.name in reused} == reused
    for what in ("manifest", "accounting"):
        pd.testing.assert_frame_equal(pd.read_parquet(Path(res.path) / f"{what}.parquet"),
                                      pd.read_parquet(clean.path / f"{what}.parquet"))
    assert not work.exists() and not work.with_name(work.name + ".lock").exists()


def test_runs_of_one_work_folder_take_turns(tmp_path):
    """``artifacts.exclusive``: a second holder waits until the first lets go, then takes the lock
    (on a fresh file: the first removed its own)."""
    import threading
    import time

    from imagegen.artifacts import exclusive

    lock = tmp_path / "w.lock"
    events: list[str] = []
    inside = threading.Event()

    def second() -> None:
        inside.wait()
        with exclusive(lock):
            events.append("second in")

    t = threading.Thread(target=second)
    t.start()
    with exclusive(lock):
        inside.set()
        time.sleep(0.3)
        events.append("first out")
    t.join(10)
    assert events == ["first out", "second in"] and not lock.exists()
