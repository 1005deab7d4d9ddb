"""The pipeline flow end to end on a real Prefect server: curate -> train -> distill -> evaluate as
subflows, the report, the registries, and reuse of the curated shards by a second run with another
family.  Everything is shrunk (70 world images, a tiny reference CLIP, a 16 px U-Net trained for 6
steps): this checks the plumbing; the stage tests check the stages."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest


from imagegen import pipeline as P
from imagegen import report as R

pytestmark = pytest.mark.slow  # 81 s alone on the shared 2 cores (less after test_orchestration.py): outside the fast tier

TINY = [
    # curate: 70 base images, a tiny reference CLIP (keep every CLIP score: it is barely trained)
    "curate.n_images=70", "curate.source.publish.stall_seconds=2.5", "curate.download.timeout=1.5",
    "curate.download.processes_count=1", "curate.download.retry_passes=0", "curate.shard.target_shard_size=20",
    "curate.filter.clip_score.threshold=-1.0",
    "curate.reference_clip.n_train=200", "curate.reference_clip.n_heldout=40", "curate.reference_clip.steps=12",
    "curate.reference_clip.warmup_steps=2", "curate.reference_clip.vision_width=8",
    "curate.reference_clip.text_width=32", "curate.reference_clip.head_width=16", "curate.reference_clip.embed_dim=32",
    "curate.reference_clip.text_layers=1",
    # train: the smoke model at 16 px with 16 channels, 6 steps
    "train.steps=6", "train.model.image_size=16",
    'train.model.net_overrides={"model_channels":16,"norm_groups":8,"head_channels":16}',
    "train.batch_size=8", "train.warmup_steps=0", "train.ckpt_every=6", "train.log_every=1",
    "train.epoch_batches=4", "train.shuffle_buffer=16", "train.sample_count=4", "train.sample_steps=2",
    # distill: 16 reflow pairs, 3 student steps
    "distill.steps=3", "distill.batch_size=4", "distill.pairs=16", "distill.pair_steps=2",
    "distill.report_count=2", "distill.report_nfe=[1,2]",
    # evaluate: 16 images each
    "evaluate.n_samples=16", "evaluate.kid_subsets=5", "evaluate.kid_subset_size=8", "evaluate.batch_size=16",
]
# the second run: same data parameters, another family (DDPM); reflow needs a flow teacher, so no distillation
SECOND = [*TINY, "train.family=ddpm", "distill.method=null"]


def _run(root: Path, overrides: list[str]):
    from flows.pipeline import pipeline_flow

    t0 = time.perf_counter()
    state = pipeline_flow(preset="smoke", overrides=overrides, data_root=str(root),
                                              return_state=True)
    wall = time.perf_counter() - t0
    assert state.is_completed(), state
    result = state.result()
    print(f"pipeline flow run {wall:.1f} s; per stage {result['seconds']}", file=sys.stderr)
    return state.state_details.flow_run_id, result


@pytest.fixture(scope="module")
def root(pipeline_root) -> Path:
    """The session's shared tiny-pipeline data root (conftest): test_orchestration.py and test_browser.py
    run the same two requests through the deployments there, so whichever module runs first computes
    them and the others find every stage done (the assertions here hold either way)."""
    return pipeline_root


@pytest.fixture(scope="module")
def first(prefect_server, root):
    return _run(root, TINY)


@pytest.fixture(scope="module")
def second(first, root):
    return _run(root, SECOND)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def test_report_holds_the_metrics_table(first):
    _, res = first
    json.dumps(res)  # the flow's result is JSON-able
    md, page = Path(res["report"]["markdown"]), Path(res["report"]["html"])
    assert md.is_file() and page.is_file() and md.parent.parent.name == "reports"
    assert md.parent.name == res["report"]["id"]
    text = md.read_text()
    assert "| metric | teacher | student |" in text
    fd = next(m for m in res["metrics"]["teacher"] if m.startswith("FD-CLIP-"))
    assert set(res["metrics"]["student"]) == set(res["metrics"]["teacher"])
    for name, value in res["metrics"]["teacher"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {R._md_cell(name)} |"))
        assert f"{value:.4g}" in row and f"{res['metrics']['student'][name]:.4g}" in row
    assert fd.startswith("FD-CLIP-") and "| NFE | 20 | 1 |" in text  # teacher_steps=20 (euler) vs 1-step reflow
    assert "| guidance | 2 | 1 |" in text  # the teacher at the guidance its pairs were drawn with
    # GenEval is skipped for the class-conditional smoke model, with the reason
    assert res["skipped"]["teacher"]["geneval"].startswith("GenEval prompts are text")
    assert "geneval skipped (GenEval prompts are text" in text
    # the dataset card summary, the loss curve, the teacher/student grids and the NFE plot, by relative path
    images = re.findall(r"!\[[^\]]*\]\((images/[^)]+)\)", text)
    assert {"images/dataset_samples.png", "images/loss_curve.png", "images/nfe_mse.png",
            "images/distill_teacher_steps50.png", "images/distill_student_1_steps1.png",
            "images/evaluated_teacher.png", "images/evaluated_student.png"} <= set(images)
    assert all((md.parent / i).is_file() and (md.parent / i).stat().st_size > 0 for i in images)
    card = json.loads((md.parent / "card.json").read_text())
    assert f"| kept | {card['summary']['dataset']['samples']} |" in text
    # the HTML page embeds every image and carries the same table
    html_text = page.read_text()
    assert html_text.count("data:image/png;base64,") == len(images) and "images/" not in html_text
    assert "<th>metric</th><th>teacher</th><th>student</th>" in html_text


def test_outputs_are_in_the_registries(first, root):
    from imagegen.evaluate.run import read_eval
    from imagegen.registry import get_dataset
    from imagegen.train.runs import get_run

    _, res = first
    ds = get_dataset(root, res["dataset_id"])
    assert ds.name == "world-smoke" and ds.shards
    teacher, student = get_run(root, res["teacher_run"]), get_run(root, res["student_run"])
    assert teacher.card["status"] == student.card["status"] == "finished"
    assert teacher.card["dataset_id"] == ds.id and teacher.card["family"] == "flow"
    assert student.card["family"] == "reflow"
    assert student.card["config"]["model"]["teacher"] == f"run:{teacher.id}"
    for role, eval_id in res["eval_ids"].items():
        card = read_eval(root, eval_id)
        assert card["run_id"] == res[f"{role}_run"] and card["metrics"] == res["metrics"][role]
    assert read_eval(root, res["eval_ids"]["student"])["request"]["reference"] == ds.id


def test_stages_are_subflows_with_their_artifacts(first):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flow_run_id, res = first
    assert set(res["flow_runs"]) == {"curate", "train", "distill", "evaluate_teacher", "evaluate_student"}
    with _client() as client:
        parent = client.read_flow_run(flow_run_id)
        for stage, child_id in res["flow_runs"].items():
            child = client.read_flow_run(child_id)
            assert child.parent_task_run_id is not None and child.state.is_completed(), stage
            assert client.read_task_run(child.parent_task_run_id).flow_run_id == parent.id
        (report,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=["pipeline-report"])))
        curate_md = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[res["flow_runs"]["curate"]]),
            key=ArtifactFilterKey(any_=["curate-summary"])))
    assert curate_md, "the curate subflow publishes its own artifacts"
    text = report.data
    assert "| metric | teacher | student |" in text and res["teacher_run"] in text and res["student_run"] in text
    assert "](images/" not in text and text.count("](data:image/png;base64,") >= 7


def test_second_run_with_another_family_reuses_the_curated_shards(first, second, root):
    from _helpers import stage_task_runs
    from imagegen.train.runs import get_run

    _, a = first
    _, b = second
    assert b["dataset_id"] == a["dataset_id"]
    assert b["teacher_run"] != a["teacher_run"] and get_run(root, b["teacher_run"]).card["family"] == "ddpm"
    assert b["student_run"] is None and set(b["eval_ids"]) == {"teacher"}
    assert set(b["flow_runs"]) == {"curate", "train", "evaluate_teacher"}
    with _client() as client:
        tasks = stage_task_runs(client, b["flow_runs"]["curate"])
    names = {t.name.rsplit("-", 1)[0] for t in tasks}
    assert {"publish-world", "reference-clip", "download", "dedup", "filter", "recaption", "shard"} <= names
    not_cached = [(t.name, t.state.name) for t in tasks if t.state.name != "Cached"]
    assert not not_cached, f"curate tasks that ran again: {not_cached}"
    text = Path(b["report"]["markdown"]).read_text()
    assert "| metric | teacher |\n" in text
    assert b["report"]["id"] != a["report"]["id"]


def test_rerunning_the_same_request_recomputes_nothing(first, root):
    """The plain functions (``--no-prefect``) over the same data root: every stage is found done."""
    from imagegen.train.runs import get_run

    _, a = first
    req = P.build_request("smoke", overrides=TINY)
    lines: list[str] = []
    s = P.run_pipeline(req, root, P.plain_stages(lines.append))
    assert s["dataset"]["id"] == a["dataset_id"] and s["report"]["id"] == a["report"]["id"]
    assert s["teacher"]["run_id"] == a["teacher_run"] and s["teacher"]["reused"]
    assert all(r["reused"] for r in s["distill"]["rounds"])
    assert {r: e["eval_id"] for r, e in s["evaluations"].items()} == a["eval_ids"]
    assert all(" cached " in line for line in lines if line.startswith("[curate]"))
    assert not [line for line in lines if line.startswith(("[train] step", "[distill] step"))]
    assert get_run(root, a["teacher_run"]).card["summary"]["step"] == 6


def test_guidance_defaults_follow_the_distillation():
    req = P.build_request("smoke")
    cfg = {"sample_guidance": 2.0, "model": {"conditioning": "class"}}
    reflow = P.distill_request(req, "t")
    both = P.eval_requests(req, "ds", "t", cfg, reflow, "s")
    assert (both["teacher"].guidance, both["student"].guidance) == (2.0, 1.0)
    assert both["teacher"].reference is None and both["student"].reference == "ds"
    fixed = P.build_request("smoke", overrides=["evaluate.guidance=3"])
    both = P.eval_requests(fixed, "ds", "t", cfg, P.distill_request(fixed, "t"), "s")
    assert (both["teacher"].guidance, both["student"].guidance) == (3.0, 3.0)
    uncond = P.eval_requests(req, "ds", "t", {"sample_guidance": 2.0, "model": {}}, reflow, "s")
    assert uncond["teacher"].guidance == 1.0


def test_bad_requests_are_refused_before_any_work(prefect_server, tmp_path):
    from flows.pipeline import pipeline_flow

    with pytest.raises(ValueError, match="distill.method=reflow needs a flow or reflow teacher.*'ddpm'"):
        P.build_request("smoke", overrides=["train.family=ddpm"])
    with pytest.raises(ValueError, match="train.steps"):
        P.build_request("smoke", overrides=["train.steps=-1"])
    with pytest.raises(ValueError, match="start with a stage"):
        P.build_request("smoke", overrides=["steps=5"])
    with pytest.raises(ValueError, match="distill.teacher cannot be set"):
        P.build_request("smoke", overrides=["distill.teacher=abc"])
    with pytest.raises(ValueError, match="(?s)curate stage: .*n_images"):
        P.build_request("smoke", overrides=["curate.source.publish.n_images=0"])
    state = pipeline_flow(preset="smoke", overrides=["train.family=edm"], data_root=str(tmp_path / "d"),
                          return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="consistency"):
        state.result()
    assert not (tmp_path / "d").exists()
