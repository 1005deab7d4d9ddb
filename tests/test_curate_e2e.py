"""End to end: ``imagegen curate --preset smoke`` through Prefect, then reuse, registry and loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def _imagegen(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("imagegen")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(prefect_server, session_tmp):
    from prefect.settings import PREFECT_API_URL

    root = session_tmp / "data"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "IMAGEGEN_DATA_ROOT": str(root)}
    t0 = time.perf_counter()
    first = _imagegen(["curate", "--preset", "smoke", "--json"], env)
    first_s = time.perf_counter() - t0
    assert first.returncode == 0, first.stderr[-4000:]
    t0 = time.perf_counter()
    second = _imagegen(["curate", "--preset", "smoke", "--json"], env)
    second_s = time.perf_counter() - t0
    assert second.returncode == 0, second.stderr[-4000:]
    print(f"smoke curate: first run {first_s:.1f}s, rerun {second_s:.1f}s", file=sys.stderr)
    return root, env, first, second


def test_a_normal_curate_logs_no_traceback(smoke_run):
    """Issue 12, finding 10: the smoke curate through Prefect (300 images in one download part,
    processes_count 2: decoded on a fork pool inside the flow process) prints no Traceback; the
    pool's workers used to inherit Prefect's SIGTERM handler and each printed a TerminationSignal
    Traceback when the pool was terminated at the end of a normal download."""
    _, _, first, second = smoke_run
    counts = _summary(first)
    assert counts["input_rows"] >= 256  # enough images for the decode pool to be used
    for proc in (first, second):
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]


def _summary(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_smoke_produces_a_registered_dataset(smoke_run):
    root, env, first, _ = smoke_run
    s = _summary(first)
    ds = Path(s["path"])
    assert ds.parent == root / "datasets" and ds.name == s["dataset_id"]
    assert 150 <= s["samples"] and s["shards"] >= 2
    card = json.loads((ds / "card.json").read_text())
    assert card["name"] == "world-smoke"
    # every input row accounted for: kept + each reason adds up to the URL count
    assert sum(s["accounting"].values()) == s["input_rows"]
    acc = pd.read_parquet(ds / "accounting.parquet")
    assert len(acc) == s["input_rows"] == acc["row_id"].nunique()
    assert (acc["outcome"] == "kept").sum() == s["samples"]
    manifest = pd.read_parquet(ds / "manifest.parquet")
    assert len(manifest) == s["samples"] and manifest["key"].is_unique
    listing = _imagegen(["datasets", "list", "--json"], env)
    assert s["dataset_id"] in listing.stdout
    show = _imagegen(["datasets", "show", "world-smoke", "--json"], env)
    assert _summary(show)["id"] == s["dataset_id"]


def test_rerun_reuses_everything(smoke_run):
    _, _, first, second = smoke_run
    a, b = _summary(first), _summary(second)
    assert a["dataset_id"] == b["dataset_id"] and a["stage_ids"] == b["stage_ids"]


def test_world_faults_end_where_they_should(smoke_run):
    s = _summary(smoke_run[2])
    card = json.loads((Path(s["path"]) / "card.json").read_text())
    by = card["world_report"]["outcome_by_planted"]

    def outcomes(kind):
        return set(by.get(kind, {}))

    # planted duplicates are found: of each (copy, original) pair at most one is kept, and the
    # other is marked as a duplicate unless another filter already dropped it
    acc = pd.read_parquet(Path(s["path"]) / "accounting.parquet").set_index("row_id")
    truth = _truth(Path(s["path"]), card)
    dups = truth[truth["planted"].isin(["exact_dup", "near_dup"])]
    assert len(dups) >= 20
    for row, orig in zip(dups["row_id"], dups["dup_of_row"]):
        pair = [acc.at[row, "outcome"], acc.at[orig, "outcome"]]
        assert pair.count("kept") <= 1, (row, orig, pair)
        assert any(o.endswith("_duplicate") for o in pair) or "kept" not in pair, (row, orig, pair)
    # bad images are caught by the right filter
    assert outcomes("tiny") == {"filtered:min_side"}
    assert outcomes("extreme_aspect") == {"filtered:aspect_ratio"}
    # blank images all share one phash: all but one are duplicates, the last fails the std filter
    assert outcomes("blank") <= {"filtered:pixel_std", "filtered:exact_duplicate", "filtered:near_duplicate"}
    assert "filtered:pixel_std" in outcomes("blank")
    assert outcomes("corrupt") == {"download_failed:corrupt_image"}
    assert outcomes("not_found") == {"download_failed:http_404"}
    # images that are fine once decoded properly are kept (unless the CLIP filter disliked the alt text)
    for kind in ("cmyk", "alpha", "png16", "exif_rotated", "redirect", "flaky"):
        assert "kept" in outcomes(kind), (kind, by.get(kind))
        assert not {"filtered:pixel_std", "filtered:min_side", "filtered:aspect_ratio"} & outcomes(kind), kind
    # clean rows: nothing else was merged as a duplicate
    clean = by.get("clean", {})
    # nothing else merged: every row marked duplicate is a planted copy, its original, or blank
    in_pairs = set(dups["row_id"]) | set(dups["dup_of_row"]) | set(truth.loc[truth["planted"] == "blank", "row_id"])
    marked = set(acc.index[acc["outcome"].str.endswith("_duplicate")])
    assert marked <= in_pairs, sorted(marked - in_pairs)
    assert not {"filtered:pixel_std", "filtered:min_side", "filtered:aspect_ratio"} & set(clean), clean
    # the CLIP filter drops mostly rows whose alt text is wrong or uninformative
    noisy = set(truth.loc[truth["caption_noise"] != "none", "row_id"])
    clip_dropped = set(acc.index[acc["outcome"] == "filtered:clip_score"])
    assert clip_dropped and len(clip_dropped & noisy) / len(clip_dropped) >= 0.8, (len(clip_dropped), len(clip_dropped & noisy))
    # recaptioning beats the noisy alt text against ground truth
    wr = card["world_report"]
    # (the CLIP filter already removed most noisy alt texts, so the kept set's alt text is good too)
    final, alt = wr["caption_accuracy_final"]["object_match"], wr["caption_accuracy_alt_text"]["object_match"]
    assert final > alt and final >= 0.98, (final, alt)


def _truth(dataset_path: Path, card: dict) -> pd.DataFrame:
    from imagegen.world.publish import read_truth

    return read_truth(dataset_path.parent.parent / "stages" / "world" / card["stage_ids"]["world"])


def test_loader_reads_the_dataset(smoke_run):
    from imagegen.loader import make_dataset
    from imagegen.registry import get_dataset

    root = smoke_run[0]
    ref = get_dataset(root, "world-smoke")
    items = list(make_dataset(ref.shards))
    assert len(items) == _summary(smoke_run[2])["samples"]


def test_flow_published_artifacts(smoke_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curate-stage-counts"])))
        md = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curate-summary"])))
    # the session's server holds every curate of the test files run before this one: take this dataset's
    s = _summary(smoke_run[2])
    table = [a for a in table if s["dataset_id"] in (a.description or "")]
    md = [a for a in md if s["dataset_id"] in (a.data or "")]
    assert table and md
    rows = table[0].data if isinstance(table[0].data, list) else json.loads(table[0].data)
    assert [r["stage"] for r in rows] == ["download", "dedup", "filter", "recaption", "shard"]
    assert rows[0]["in"] == s["input_rows"] and rows[-1]["kept"] == s["samples"]
    assert "data:image/png;base64," in md[0].data
