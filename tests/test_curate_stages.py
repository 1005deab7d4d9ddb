"""The curate DAG without Prefect: content-addressed reuse, partial recomputation, bad input."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from imagegen import curate as C
from imagegen.presets import CURATE_PRESETS, build_config, parse_override
from imagegen.registry import RegistryError, get_dataset, list_datasets

TINY = [
    "name=tiny", "source.publish.n_images=90", "source.publish.stall_seconds=2.5",
    "reference_clip.n_train=200", "reference_clip.n_heldout=40", "reference_clip.steps=12",
    "reference_clip.warmup_steps=2", "reference_clip.vision_width=64", "reference_clip.text_width=64",
    "reference_clip.head_width=32", "reference_clip.vision_layers=1", "reference_clip.text_layers=1",
    "download.timeout=1.5", "download.processes_count=1", "shard.target_shard_size=20",
    "filter.clip_score.threshold=-1.0",
]


def _cfg(*extra: str) -> C.CurateConfig:
    return build_config(C.CurateConfig, CURATE_PRESETS, "smoke", [*TINY, *extra])


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    log: list[tuple[str, bool]] = []
    first = C.curate(_cfg(), root, progress=lambda st, r: log.append((st, r.cached)))
    first_log, log[:] = list(log), []
    again = C.curate(_cfg(), root, progress=lambda st, r: log.append((st, r.cached)))
    again_log, log[:] = list(log), []
    changed = C.curate(_cfg("filter.min_side=40", "name=tiny-b"), root,
                       progress=lambda st, r: log.append((st, r.cached)))
    return root, (first, first_log), (again, again_log), (changed, list(log))


@pytest.mark.slow
def test_first_run_computes_every_stage(tiny_runs):
    _, (ref, log), *_ = tiny_runs
    assert [s for s, _ in log] == ["world", "reference_clip", "download", "dedup", "filter", "recaption", "shard"]
    assert not any(cached for _, cached in log)
    assert ref.shards and all(p.stat().st_size > 0 for p in ref.shards)


@pytest.mark.slow
def test_rerun_is_free_and_returns_the_same_dataset(tiny_runs):
    _, (first, _), (again, log), _ = tiny_runs
    assert again.id == first.id and again.path == first.path
    assert all(cached for _, cached in log), log


@pytest.mark.slow
def test_changing_one_stage_recomputes_it_and_later_ones_only(tiny_runs):
    root, (first, _), _, (changed, log) = tiny_runs
    cached = dict(log)
    assert cached["world"] and cached["reference_clip"] and cached["download"] and cached["dedup"]
    assert not cached["filter"] and not cached["recaption"] and not cached["shard"]
    assert changed.id != first.id
    # both datasets stay in the registry, each under its own name
    assert {r.id for r in list_datasets(root)} >= {first.id, changed.id}
    assert get_dataset(root, "tiny").id == first.id and get_dataset(root, "tiny-b").id == changed.id
    assert get_dataset(root, first.id[:8]).id == first.id
    with pytest.raises(RegistryError, match="no dataset 'nope'"):
        get_dataset(root, "nope")


@pytest.mark.slow
def test_stage_folders_are_complete_and_carry_cards(tiny_runs):
    root = tiny_runs[0]
    for stage in ("world", "download", "dedup", "filter", "recaption"):
        folders = list((root / "stages" / stage).iterdir())
        assert folders and all((f / "card.json").is_file() for f in folders), stage
        assert not [f for f in folders if ".tmp-" in f.name]


@pytest.mark.slow
def test_accounting_adds_up(tiny_runs):
    ref = tiny_runs[1][0]
    acc = pd.read_parquet(ref.path / "accounting.parquet")
    card = ref.card
    assert len(acc) == card["counts"]["download"]["input_rows"] == acc["row_id"].nunique()
    assert (acc["outcome"] == "kept").sum() == card["counts"]["shard"]["samples"]
    assert sum(card["counts"]["accounting"].values()) == len(acc)


# ---------------------------------------------------------------------------- bad input

def test_unwritable_data_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        C.check_preconditions(_cfg(), blocker / "root")


def test_port_already_taken(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is already in use"):
            C.check_preconditions(_cfg(f"source.world_port={port}"), tmp_path)


def test_bad_parameters_are_refused_before_work():
    with pytest.raises(ValueError, match="timeout"):
        _cfg("download.timeout=-1")
    with pytest.raises(ValueError, match="unknown preset"):
        build_config(C.CurateConfig, CURATE_PRESETS, "huge", [])
    with pytest.raises(ValueError, match="url_list"):
        _cfg("source.kind=url_list")
    with pytest.raises(ValueError):
        _cfg("download.no_such_option=1")
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=x y") == {"a": "x y"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("imagegen")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow
def test_cli_reports_bad_input_clearly(tmp_path):
    pd.DataFrame({"link": ["http://127.0.0.1/a.jpg"], "caption": ["a"]}).to_parquet(tmp_path / "l.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    root = ["--data-root", str(tmp_path)]
    # four independent commands: started together (each is mostly its interpreter's imports), then checked
    with ThreadPoolExecutor(4) as pool:
        timeout, columns, unreadable, unknown = pool.map(lambda args: _cli(*args, cwd=tmp_path), [
            ("curate", "--no-prefect", "--set", "download.timeout=-1", *root),
            ("curate", "--no-prefect", "--url-list", str(tmp_path / "l.parquet"), *root),
            ("curate", "--no-prefect", "--url-list", str(tmp_path / "bad.parquet"), *root),
            ("datasets", "show", "nope", *root)])
    assert timeout.returncode == 2 and "download.timeout" in timeout.stderr
    assert columns.returncode == 2 and "no column(s) ['url']" in columns.stderr and "link" in columns.stderr
    assert unreadable.returncode == 2 and "could not be read" in unreadable.stderr
    assert unknown.returncode == 2 and "no dataset 'nope'" in unknown.stderr


@pytest.mark.slow
def test_model_filters_run_through_open_clip(tiny_runs, tmp_path):
    """CLIP top-fraction and zero-shot filters on the tiny world, with its reference CLIP."""
    from imagegen.stages.filter import ClipScoreFilterConfig, FilterConfig, run_filter

    root, (ref, _), *_ = tiny_runs
    ids = ref.card["stage_ids"]
    clip_dir = root / "models" / "reference_clip" / ids["reference_clip"]
    resolve = C.model_resolver(C.StageResult("reference_clip", ids["reference_clip"], str(clip_dir)))
    cfg = FilterConfig(clip_score=ClipScoreFilterConfig(mode="top_fraction", top_fraction=0.5),
                       nsfw=FilterConfig.zero_shot("nsfw"))
    dl = root / "stages" / "download" / ids["download"]
    dd = root / "stages" / "dedup" / ids["dedup"] / "dedup.parquet"
    run_filter(dl, dd, cfg, tmp_path / "f.parquet", resolve_model=resolve)
    out = pd.read_parquet(tmp_path / "f.parquet")
    assert out["nsfw_score"].between(0, 1).all()
    candidates = out["reason"].isna() | (out["reason"] == "clip_score")
    assert out["clip_score_pass"][candidates].sum() == round(0.5 * candidates.sum())
    assert out["clip_score_score"].between(-1, 1).all()
    with pytest.raises(ValueError, match="only exists for source.kind='world'"):
        C.model_resolver(None)("world")
