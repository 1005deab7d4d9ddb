"""The benchmark flow through a real Prefect server: evaluations with identical settings, the
leaderboard (parquet, markdown, plots), artifacts under stable keys, reuse on a rerun, the
registry query, and ``imagegen benchmark``.

Two tiny runs: a text-conditioned EDM teacher (4 steps) and a consistency student distilled from
it (3 steps), so the leaderboard has a teacher and its student; both evaluated at their default
steps and at 1 and 2 steps.  Plumbing, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from _helpers import TINY_UNET, eval_world_root, tiny_text_run, flow_artifacts, artifact_data

pytestmark = pytest.mark.slow  # 40 s on the shared 2 cores: outside the fast tier (README, "Tests")

SETTINGS = {"n_samples": 32, "kid_subsets": 10, "kid_subset_size": 16, "geneval_max_prompts": 6,
            "geneval_per_prompt": 1, "batch_size": 32}
SWEEP = [1, 2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The data root with a teacher, its consistency student, and a stopped (unfinished) flow run."""
    from imagegen.distill import distill
    from imagegen.train.runs import train_run

    root = tmp_path_factory.mktemp("benchmark-flow")
    eval_world_root(root)
    teacher = tiny_text_run(root, "edm", steps=4)
    student = distill({"teacher": teacher, "method": "consistency", "steps": 3, "batch_size": 4,
                                          "levels": 4, "report_count": 2, "report_nfe": [1, 2]}, root)
    stopped = train_run({"dataset": "world-tiny", "train": {
        "family": "flow", "model": TINY_UNET, "steps": 3, "batch_size": 4, "ckpt_every": 1}}, root, stop_after=1)
    return {"root": root, "teacher": teacher, "student": student["student_run"], "stopped": stopped["run_id"]}


def _flow(world):
    from flows.benchmark import benchmark_flow

    state = benchmark_flow(families=["edm", "consistency"], settings=SETTINGS, nfe_sweep=SWEEP,
                                              data_root=str(world["root"]), return_state=True)
    assert state.is_completed(), state
    return state.state_details.flow_run_id, state.result()


def _sample_times(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "evals").glob("*/samples/*.png")}


@pytest.fixture(scope="module")
def flow_runs(prefect_server, world):
    first = _flow(world)
    times = _sample_times(world["root"])
    second = _flow(world)
    return first, second, times


def test_benchmark_writes_the_leaderboard(flow_runs, world):
    (_, board), _, _ = flow_runs
    json.dumps(board)  # the flow's result is JSON-able
    t, s = world["teacher"], world["student"]
    assert board["failed"] == [] and sorted(board["runs"]) == sorted([t, s])
    out = Path(board["path"])
    assert out == world["root"] / "leaderboards" / board["leaderboard_id"]
    df = pd.read_parquet(board["files"]["parquet"])
    # EDM's default is 18 Heun steps (NFE 2*18 - 1), the student's 1 step; the sweep adds 1 and 2 steps
    # (the student's default already is 1 step: evaluated once)
    assert sorted(zip(df["run_id"], df["steps"], df["nfe"])) == sorted(
        [(t, 18, 35), (t, 1, 1), (t, 2, 3), (s, 1, 1), (s, 2, 2)])
    assert len(set(df["eval_id"])) == 5
    main = board["main_metric"]
    assert main.startswith("FD-CLIP-") and board["lower_is_better"] is True
    assert df[main].tolist() == sorted(df[main].tolist()), "best (lowest distance) first"
    assert {"GenEval overall", "KD-" + main[3:]} <= set(df.columns)
    by_run = df.groupby("run_id").first()
    assert by_run.loc[s, "teacher_run"] == t and pd.isna(by_run.loc[t, "teacher_run"])
    assert (df["lineage"] == t).all(), "the student is drawn in its teacher's panel"
    assert by_run.loc[t, "family"] == "edm" and by_run.loc[s, "family"] == "consistency"
    assert by_run.loc[t, "trained_steps"] == 4 and by_run.loc[s, "trained_steps"] == 3
    assert (df["dataset"] == "world-tiny").all() and (df["n_samples"] == 32).all()
    # every value is the one its evaluation wrote
    for _, row in df.iterrows():
        rows = pd.read_parquet(world["root"] / "evals" / row["eval_id"] / "metrics.parquet").set_index("metric")
        assert rows.loc[main, "value"] == pytest.approx(row[main]) and rows.loc[main, "run_id"] == row["run_id"]
    md = Path(board["files"]["markdown"]).read_text()
    lines = md.splitlines()
    assert f"best first by **{main}**" in md
    assert sum(x.startswith(f"| {s} | consistency | {t} |") for x in lines) == 2
    assert sum(x.startswith(f"| {t} | edm | - |") for x in lines) == 3
    assert "](metric_per_family.png)" in md and "](metric_vs_nfe.png)" in md
    for key in ("family_plot", "nfe_plot"):
        data = Path(board["files"][key]).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    card = json.loads((out / "card.json").read_text())
    assert card["settings"] == SETTINGS and card["nfe_sweep"] == SWEEP and sorted(card["eval_ids"]) == sorted(df["eval_id"])


def test_benchmark_publishes_artifacts(flow_runs):
    (flow_run_id, board), _, _ = flow_runs
    (table,) = flow_artifacts(flow_run_id, "leaderboard")
    got = artifact_data(table)
    main = board["main_metric"]
    assert [(r["run_id"], r["steps"], r["eval_id"]) for r in got] == \
        [(r["run_id"], r["steps"], r["eval_id"]) for r in board["rows"]]
    assert [r[main] for r in got] == pytest.approx([r[main] for r in board["rows"]])
    (md,) = flow_artifacts(flow_run_id, "leaderboard-report")
    assert board["leaderboard_id"] in md.data and md.data.count("data:image/png;base64,") == 2  # both plots
    assert "## Failed evaluations" not in md.data


def test_rerun_reuses_evaluations_and_adds_artifact_versions(flow_runs, world):
    (first_id, first), (second_id, second), times = flow_runs
    assert second["eval_ids"] == first["eval_ids"] and second["leaderboard_id"] == first["leaderboard_id"]
    assert [r["nfe"] for r in second["rows"]] == [r["nfe"] for r in first["rows"]], "reused sets keep their NFE"
    assert _sample_times(world["root"]) == times, "no image is generated again"
    versions = {a.flow_run_id for a in flow_artifacts(key="leaderboard")}
    assert {first_id, second_id} <= versions
    assert {first_id, second_id} <= {a.flow_run_id for a in flow_artifacts(key="leaderboard-report")}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        (latest,) = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=["leaderboard"])))
    assert latest.flow_run_id == second_id


def test_select_runs(world):
    from imagegen.leaderboard import select_runs

    root, t, s, stopped = world["root"], world["teacher"], world["student"], world["stopped"]
    assert select_runs(root) == [t, s]  # finished runs, oldest first
    assert select_runs(root, status=None) == [t, s, stopped]
    assert select_runs(root, status="stopped") == [stopped]
    assert select_runs(root, families=["consistency"]) == [s]
    assert select_runs(root, families=["edm", "flow"], status=None) == [t, stopped]
    assert select_runs(root, families=["ddpm"]) == []  # a known family without runs
    assert select_runs(root, dataset="world-tiny") == [t, s]
    with pytest.raises(ValueError, match=r"unknown family \['nope'\]"):
        select_runs(root, families=["nope"])
    with pytest.raises(LookupError, match="no-such-dataset"):
        select_runs(root, dataset="no-such-dataset")


# ------------------------------------------------------------------------------------------ command line


def _cli(world, *args: str) -> list[str]:
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return ["benchmark", *args, *sets, "--data-root", str(world["root"]), "--no-prefect"]


def test_cli_json_reuses_the_flows_evaluations(flow_runs, world, capsys):
    from imagegen.cli import main

    (_, board), _, times = flow_runs
    assert main(_cli(world, "--runs", f"{world['student'][:8]},{world['teacher']}", "--nfe", "2", "--json")) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 1, out.out[-2000:]
    got = json.loads(lines[0])
    assert sorted(got["runs"]) == sorted([world["teacher"], world["student"]])
    assert len(got["rows"]) == 4 and set(got["eval_ids"]) <= set(board["eval_ids"])
    assert got["leaderboard_id"] != board["leaderboard_id"] and Path(got["files"]["parquet"]).is_file()
    assert _sample_times(world["root"]) == times
    # without --json: the markdown table, then the leaderboard folder
    assert main(_cli(world, "--families", "consistency")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(world["root"] / "leaderboards" / Path(lines[-1]).name) and Path(lines[-1]).is_dir()
    assert lines[0].startswith("# Leaderboard ") and any(world["student"] in line for line in lines)


BAD = {
    "unknown run": (["--runs", "nope-nope"], "no training run 'nope-nope'"),
    "unknown family": (["--families", "nope"], "unknown family ['nope']"),
    "unknown dataset": (["--dataset", "no-such-dataset"], "no-such-dataset"),
    "no matching run": (["--families", "ddpm"], "no finished run matches families=['ddpm']"),
    "list and query": (["--runs", "abc", "--families", "edm"], "not both"),
    "per-run setting": (["--set", "run=abc"], "['run'] cannot be among them"),
    "unknown setting": (["--set", "zzz=1"], "invalid parameters"),
    "nfe not a number": (["--nfe", "1,two"], "--nfe takes comma-separated step counts"),
    "nfe below one": (["--nfe", "0,2"], "step counts (integers >= 1); got [0]"),
    "unknown sampler": (["--set", "sampler=zigzag"], "unknown sampler 'zigzag'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_refuses_bad_input(case, world, capsys):
    from imagegen.cli import main

    extra, message = BAD[case]
    root = world["root"]

    def listing():
        return [sorted(p.name for p in (root / d).iterdir()) if (root / d).is_dir() else []
                for d in ("evals", "leaderboards")]

    before = listing()
    code = main(_cli(world, *extra))
    out = capsys.readouterr()
    assert code == 2
    assert out.err.startswith("imagegen benchmark:") and message in out.err, out.err[-3000:]
    assert out.out == ""
    assert listing() == before, "nothing is evaluated or written before the input is checked"


def test_a_failed_evaluation_keeps_the_others(prefect_server, world):
    """A damaged CLIPScore weights file (present, so the checks before work pass) fails the text
    teacher's evaluation while it runs (the unconditional run has no CLIPScore to compute): the
    leaderboard of the run that worked is still written and published, the report lists the
    failure, and the flow ends Failed naming it."""
    from flows.benchmark import benchmark_flow

    missing = world["root"] / "damaged-weights.safetensors"
    missing.write_bytes(b"these bytes are not a safetensors file")
    settings = {**SETTINGS, "n_samples": 20, "steps": 1, "metrics": ["fid", "clipscore"],
                "clip_model": f"ViT-B-32:{missing}"}
    state = benchmark_flow(runs=[world["teacher"], world["stopped"]], settings=settings,
                                              data_root=str(world["root"]), return_state=True)
    assert state.is_failed(), state
    exc = state.result(raise_on_failure=False)
    assert "1 of 2 evaluations failed" in str(exc) and world["teacher"] in str(exc)
    (table,) = flow_artifacts(state.state_details.flow_run_id, "leaderboard")
    assert [r["run_id"] for r in artifact_data(table)] == [world["stopped"]]
    (md,) = flow_artifacts(state.state_details.flow_run_id, "leaderboard-report")
    assert "## Failed evaluations" in md.data and f"run `{world['teacher']}` at 1 step:" in md.data
    assert str(missing) in md.data
