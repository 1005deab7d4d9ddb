"""Incremental datasets: name@N versions in the registry, and a version that reuses its parent's
parts, fetching again only the rows that failed for a transient reason."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from imagegen.artifacts import write_json_atomic
from imagegen.paths import datasets_dir
from imagegen.registry import RegistryError, get_dataset, register_name, versions_of
from imagegen.stages.ledger import read_ledger


def _fake_dataset(root: Path, did: str, name: str, t: int) -> None:
    d = datasets_dir(root) / did
    d.mkdir(parents=True)
    write_json_atomic(d / "card.json", {"id": did, "name": name, "created_unix": t})


def test_versions_are_kept_and_latest_is_the_default(tmp_path):
    for i, did in enumerate(["a" * 16, "b" * 16, "c" * 16]):
        _fake_dataset(tmp_path, did, "laion", i)
    register_name(tmp_path, "laion", "a" * 16)
    register_name(tmp_path, "laion", "b" * 16)
    register_name(tmp_path, "laion", "b" * 16)  # the same content again is no new version
    assert versions_of(tmp_path, "laion") == ["a" * 16, "b" * 16]
    assert get_dataset(tmp_path, "laion").id == "b" * 16  # latest by default
    assert get_dataset(tmp_path, "laion@1").id == "a" * 16 and get_dataset(tmp_path, "laion@2").id == "b" * 16
    register_name(tmp_path, "laion", "a" * 16)  # pointing back: the name follows, numbers never move
    assert get_dataset(tmp_path, "laion").id == "a" * 16 and versions_of(tmp_path, "laion") == ["a" * 16, "b" * 16]
    register_name(tmp_path, "laion", "c" * 16)
    assert get_dataset(tmp_path, "laion@3").id == "c" * 16
    with pytest.raises(RegistryError, match="@1..@3"):
        get_dataset(tmp_path, "laion@4")
    with pytest.raises(RegistryError, match="no dataset named 'other'"):
        get_dataset(tmp_path, "other@1")


def test_registries_from_before_versions_read_as_version_1(tmp_path):
    _fake_dataset(tmp_path, "d" * 16, "old", 0)
    write_json_atomic(datasets_dir(tmp_path) / "names.json", {"old": "d" * 16})
    assert get_dataset(tmp_path, "old@1").id == "d" * 16 and versions_of(tmp_path, "old") == ["d" * 16]


def test_append_needs_a_parent():
    from imagegen.curate import CurateConfig

    with pytest.raises(ValueError, match="append_list needs a parent"):
        CurateConfig(download={"append_list": "/x.parquet"})
    assert CurateConfig(parent="world@1").download.parent == "world@1"


_TINY = [
    "name=inc", "source.publish.n_images=80", "source.publish.stall_seconds=2.5", "source.publish.flaky_rate=0.1",
    "reference_clip.n_train=200", "reference_clip.n_heldout=40", "reference_clip.steps=12",
    "reference_clip.warmup_steps=2", "reference_clip.vision_width=64", "reference_clip.text_width=64",
    "reference_clip.head_width=32", "reference_clip.vision_layers=1", "reference_clip.text_layers=1",
    "download.timeout=1.5", "download.processes_count=1", "shard.target_shard_size=20",
    "filter.clip_score.threshold=-1.0", "download.number_sample_per_shard=30",
]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_new_version_retries_only_the_transient_failures(tmp_path):
    from imagegen import curate as C
    from imagegen.presets import CURATE_PRESETS, build_config
    from imagegen.world.publish import read_truth

    v1 = C.curate(build_config(C.CurateConfig, CURATE_PRESETS, "smoke", [*_TINY, "download.retry_passes=0"]), tmp_path)
    led1 = read_ledger(C.stage_dir(tmp_path, "download", v1.card["stage_ids"]["download"]))
    truth = read_truth(C.stage_dir(tmp_path, "world", v1.card["stage_ids"]["world"]))
    flaky = set(truth.loc[truth["planted"] == "flaky", "row_id"])
    assert flaky and set(led1.loc[led1["reason"] == "http_5xx", "row_id"]) == flaky  # no retry pass in v1

    log: list[tuple[str, bool]] = []
    v2 = C.curate(build_config(C.CurateConfig, CURATE_PRESETS, "smoke", [*_TINY, "parent=inc"]), tmp_path,
                  progress=lambda st, r: log.append((st, r.cached)))
    dl2 = C.stage_dir(tmp_path, "download", v2.card["stage_ids"]["download"])
    dl1 = C.stage_dir(tmp_path, "download", v1.card["stage_ids"]["download"])
    led2 = read_ledger(dl2)
    assert len(led2) == len(led1) and list(led2["row_id"]) == sorted(led2["row_id"])
    got = led2.set_index("row_id")
    assert (got.loc[sorted(flaky), "status"] == "success").all()  # recovered in the new version
    assert (got.loc[sorted(flaky), "attempts"] == 3).all()  # 1 in v1, 2 (500, then 200) in v2
    transient = led1["reason"].isin(["timeout", "http_5xx", "truncated", "connection_error", "http_429"])
    same = led1.loc[~transient].set_index("row_id")
    pd.testing.assert_frame_equal(got.loc[same.index, ["status", "reason", "attempts", "sha256"]],
                                  same[["status", "reason", "attempts", "sha256"]])
    # the parent's parts are reused as they are (the same files), the refetched rows are new parts
    parts1 = sorted((dl1 / "images").glob("part-*.parquet"))
    for p in parts1:
        assert os.path.samefile(p, dl2 / "images" / p.name) or p.read_bytes() == (dl2 / "images" / p.name).read_bytes()
    counts = v2.card["counts"]
    assert counts["download"]["incremental"]["reused_parts"] == len(parts1)
    assert counts["download"]["incremental"]["recovered"] == len(flaky)
    assert counts["filter"]["parts"]["reused"] == len(parts1)  # unchanged parts are not rescored
    # two versions under one name; the card knows its parent
    assert get_dataset(tmp_path, "inc@1").id == v1.id and get_dataset(tmp_path, "inc@2").id == v2.id
    assert get_dataset(tmp_path, "inc").id == v2.id
    assert v2.card["parent"]["id"] == v1.id and v2.card["parent"]["version"] == 1
    acc = pd.read_parquet(v2.path / "accounting.parquet")
    assert len(acc) == len(led1) and not acc["outcome"].str.startswith("download_failed:http_5xx").any()


def test_child_ledger_is_merged_part_by_part(tmp_path):
    """The child's ledger is streamed from the parent's and the new download's part files: a refetched
    row replaces the parent's (attempts added up), appended rows follow; the same rows as one
    in-memory merge, in row-id order, each row once; a parent not in row-id order is refused."""
    import numpy as np

    from imagegen.stages import download as D
    from imagegen.stages.incremental import _merged_ledger
    from imagegen.stages.ledger import LedgerWriter, write_ledger

    def ledger(ids, status, attempts):
        n = len(ids)
        f = pd.DataFrame({c: [None] * n for c in D.LEDGER_COLUMNS})
        f["row_id"], f["url"], f["caption"] = ids, [f"http://x/{i}" for i in ids], "c"
        f["status"], f["attempts"] = status, attempts
        f["reason"] = [None if s == "success" else "timeout" for s in status]
        f.loc[f["status"] == "success", "width"] = 8
        return D.ledger_frame(f)

    parent = ledger(list(range(25)), ["failed" if i % 7 == 3 else "success" for i in range(25)], 1)
    write_ledger(tmp_path / "parent", parent, rows_per_file=6)
    retried = [3, 10, 17, 24]
    new = ledger(retried + [25, 26, 27], ["success", "failed", "success", "success", "success", "skipped", "success"],
                 [1, 1, 1, 1, 1, 0, 1])
    write_ledger(tmp_path / "new", new, rows_per_file=4)
    want = pd.concat([parent.set_index("row_id").drop(index=retried),
                      new.set_index("row_id").assign(attempts=lambda f: f["attempts"] + parent.set_index(
                          "row_id")["attempts"].reindex(f.index).fillna(0).astype("Int64"))]).sort_index()
    w = LedgerWriter(tmp_path / "child", 5, D.LEDGER_SCHEMA)
    for part in _merged_ledger(tmp_path / "parent", tmp_path / "new"):
        w.add(part)
    w.close()
    got = read_ledger(tmp_path / "child")
    pd.testing.assert_frame_equal(got, D.ledger_frame(want.reset_index()))
    assert got.loc[got["row_id"].isin(retried), "attempts"].tolist() == [2, 2, 2, 2]
    assert list(got["row_id"]) == list(range(28)) and D.summarize_ledger(got)["input_rows"] == 28
    write_ledger(tmp_path / "unordered", parent.iloc[np.r_[6:12, 0:6]], rows_per_file=6)
    with pytest.raises(ValueError, match="not in row-id order"):
        list(_merged_ledger(tmp_path / "unordered", None))
