"""The distill flow through a real Prefect server, its artifacts, and ``imagegen distill``.

A tiny EDM teacher is trained for a few steps on a registered world dataset, then distilled by
consistency distillation for a few steps: this checks the plumbing (runs, checkpoint, report,
artifacts, command line), not the quality, which tests/test_distill.py measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import register_world_dataset, flow_artifacts, artifact_data


NET = {"net": "unet", "net_size": "tiny", "image_size": 16,
       "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}
# a tiny consistency distillation: 3 student steps, 4 Karras levels, 2 images per report row at NFE 1 and 2
TINY_CD = ["steps=3", "batch_size=4", "levels=4", "report_count=2", "report_nfe=[1,2]"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("distill-flow")
    register_world_dataset(r, n=32, per_shard=16)
    return r


@pytest.fixture(scope="module")
def teacher(root) -> str:
    """A finished 4-step EDM run: enough to be a teacher, not to be a good one."""
    from imagegen.train.runs import train_run

    req = {"dataset": "world-tiny", "train": {
        "family": "edm", "model": NET, "steps": 4, "batch_size": 8, "lr": 2e-3, "warmup_steps": 0,
        "ckpt_every": 4, "log_every": 1, "epoch_batches": 2, "shuffle_buffer": 16, "sample_count": 2,
        "sample_steps": 2, "seed": 2}}
    return train_run(req, root)["run_id"]


@pytest.fixture(scope="module")
def flow_run(prefect_server, root, teacher):
    from flows.distill import distill_flow

    state = distill_flow(teacher=teacher, method="consistency", overrides=TINY_CD,
                                            data_root=str(root), return_state=True)
    assert state.is_completed(), state
    return state.state_details.flow_run_id, state.result()


def test_flow_distils_a_student(flow_run, root, teacher):
    from imagegen.train.runs import get_run
    from models.checkpoint import load_family

    _, s = flow_run
    json.dumps(s)  # the flow's result is JSON-able
    assert s["method"] == "consistency" and s["teacher_run"] == teacher
    (rnd,) = s["rounds"]
    assert rnd["steps"] == 1 and not rnd["reused"] and s["student_run"] == rnd["run_id"] != teacher
    assert s["student_checkpoint"] == rnd["checkpoint"] and Path(s["student_checkpoint"]).is_dir()
    run = get_run(root, s["student_run"])
    assert run.card["status"] == "finished" and run.card["summary"]["step"] == 3
    assert run.card["config"]["family"] == "consistency" and run.card["config"]["model"]["teacher"] == f"run:{teacher}"
    student = load_family(s["student_checkpoint"])
    assert student.name == "consistency" and student.default_steps == 1
    x = student.sample(2, x_T=torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0)))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    # the report: the teacher at 50 steps is the reference, then teacher and student at NFE <= 2
    rows = s["report"]["rows"]
    assert rows[0]["model"] == "teacher" and rows[0]["steps"] == 50 and rows[0]["mse_to_reference"] == 0.0
    assert {r["model"] for r in rows[1:]} == {"teacher", "student_1"}
    assert {r["nfe"] for r in rows[1:] if r["model"] == "student_1"} == {1, 2}
    assert all(1 <= r["nfe"] <= 2 and r["mse_to_reference"] > 0 for r in rows[1:])
    assert all(Path(r["grid"]).is_file() for r in rows)
    assert Path(s["report"]["plot"]).is_file() and Path(s["report"]["table"]).is_file()
    assert s["report"]["reused"] is False


def test_flow_publishes_artifacts(flow_run, teacher):
    flow_run_id, s = flow_run
    rows = s["report"]["rows"]
    (table,) = flow_artifacts(flow_run_id, "distill-report")
    got = artifact_data(table)
    assert [(r["model"], r["steps"], r["nfe"]) for r in got] == [(r["model"], r["steps"], r["nfe"]) for r in rows]
    assert [r["mse_to_reference"] for r in got] == pytest.approx([r["mse_to_reference"] for r in rows])
    assert [r["run_id"] for r in got] == [teacher if r["model"] == "teacher" else s["student_run"] for r in rows]
    (md,) = flow_artifacts(flow_run_id, "distill-summary")
    text = md.data
    assert teacher in text and s["student_run"] in text
    assert text.count("data:image/png;base64,") == 1 + len(rows)  # the NFE plot + every grid
    for r in rows[1:]:
        assert f"### {r['model']}, NFE {r['nfe']} ({r['steps']} step" in text
    assert f"### teacher, NFE {rows[0]['nfe']} (50 steps, reference)" in text
    progress = [a for a in flow_artifacts(flow_run_id) if a.type == "progress"]
    assert [a.key for a in progress] == ["distill-progress"]
    assert float(artifact_data(progress[0])) == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------ command line


def _cli(root: Path, teacher: str, method: str = "consistency", extra: tuple[str, ...] = ()) -> list[str]:
    args = ["distill", "--teacher", teacher, "--method", method, "--data-root", str(root), "--no-prefect"]
    for o in TINY_CD:
        args += ["--set", o]
    return [*args, *extra]


def test_cli_reuses_the_flows_student(flow_run, root, teacher, capsys):
    from imagegen.cli import main

    _, s = flow_run
    # a unique id prefix names the same teacher, so the same request: the finished student is reused
    assert main(_cli(root, teacher[:8], extra=("--json",))) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 1, out.out[-2000:]
    got = json.loads(lines[0])
    assert got["student_run"] == s["student_run"] and got["teacher_run"] == teacher
    assert got["rounds"][0]["reused"] is True and got["student_checkpoint"] == s["student_checkpoint"]
    assert got["report"]["rows"] == s["report"]["rows"] and got["report"]["reused"] is True  # not recomputed
    # without --json: the student run id alone
    assert main(_cli(root, teacher)) == 0
    assert capsys.readouterr().out.strip().splitlines() == [s["student_run"]]


BAD = {
    "unknown teacher": ("nope-nope", "consistency", (), "no training run 'nope-nope'"),
    "wrong family": (None, "reflow", (), "reflow distillation needs a flow-matching run"),
    "progressive ratio": (None, "progressive", ("--set", "start_steps=48", "--set", "target_steps=4"),
                          "start_steps=48 must be target_steps=4 times a power of two"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_refuses_bad_input(case, root, teacher, capsys):
    from imagegen.cli import main

    run_id, method, extra, message = BAD[case]
    runs_before = sorted(p.name for p in (root / "runs").iterdir())
    datasets_before = sorted(p.name for p in (root / "datasets").iterdir())
    code = main(_cli(root, run_id or teacher, method, extra))
    out = capsys.readouterr()
    assert code == 2
    assert out.err.startswith("imagegen distill:") and message in out.err, out.err
    if case == "wrong family":
        assert f"teacher run {teacher} is family 'edm'" in out.err
    assert out.out == ""
    assert sorted(p.name for p in (root / "runs").iterdir()) == runs_before
    assert sorted(p.name for p in (root / "datasets").iterdir()) == datasets_before


def test_build_request_applies_named_parameters_last():
    from imagegen.distill import DistillRequest
    from imagegen.requests import build_distill_request as build_request

    req = build_request(overrides=["teacher=other", "method=reflow", "steps=7", "report_nfe=[1,4]"],
                        teacher="123", method="consistency")
    assert req.teacher == "123" and req.method == "consistency" and req.steps == 7 and req.report_nfe == (1, 4)
    base = DistillRequest(teacher="abc", method="reflow", pairs=10)
    assert build_request(base) is base
    again = build_request(base, method="consistency", overrides=["levels=6"])
    assert again.teacher == "abc" and again.pairs == 10 and again.levels == 6 and again.method == "consistency"
    with pytest.raises(ValueError, match="method"):
        build_request(teacher="abc")
