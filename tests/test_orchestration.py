"""The deployments on a real ``prefect server start`` (the ``live_prefect`` fixture: imagegen.serve's
functions, a process worker): the pipeline triggered through the API the way the UI does
(``create_flow_run_from_deployment`` with parameters), refusal of bad parameters by the server,
the benchmark's nightly schedule and a new leaderboard version, reuse of the curated shards by a
second pipeline run with another family, and the ``gpu`` concurrency limit.

The pipeline is the tiny one of test_pipeline.py (70 world images, a 16 px U-Net trained 6 steps):
this checks the orchestration; test_pipeline.py checks the pipeline itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import SECOND, TINY

from imagegen import serve as S

pytestmark = pytest.mark.slow

ORDER = ["curate/curate", "train/train", "distill/distill", "evaluate/evaluate", "pipeline/pipeline",
         "benchmark/benchmark", "control-benchmark/control-benchmark", "import/import", "sample/sample"]
DEPLOYMENTS = set(ORDER)
# tiny evaluation settings for the benchmark run (the nightly defaults evaluate 1000 images at 4 NFEs)
BENCH_SETTINGS = {"n_samples": 16, "kid_subsets": 5, "kid_subset_size": 8, "batch_size": 16,
                  "metrics": ["fid", "kid", "clipscore"]}


def run_deployment(live: S.Served, name: str, parameters: dict[str, Any], timeout: float = 900.0) -> Any:
    """Create a flow run of deployment ``name`` with ``parameters`` (what the UI's Run button posts),
    wait until it ends, and require it completed (else: its state and the worker's log)."""
    with S.client(live.api_url) as c:
        dep = c.read_deployment_by_name(name)
        created = c.create_flow_run_from_deployment(dep.id, parameters=parameters)
    run = S.wait_for_flow_run(live.api_url, created.id, timeout=timeout)
    assert run.state.is_completed(), (f"{name} flow run {run.name}: {run.state.name}: {run.state.message}\n"
                                      f"worker log ({live.worker.log}):\n{live.worker.tail(80)}")
    return run


def subflows(live: S.Served, parent_id: Any) -> dict[str, list[Any]]:
    """The child flow runs of a flow run, by flow name."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with S.client(live.api_url) as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        names = {r.flow_id: c.read_flow(r.flow_id).name for r in runs}
    out: dict[str, list[Any]] = {}
    for r in runs:
        out.setdefault(names[r.flow_id], []).append(r)
    return out


def artifacts(live: S.Served, key: str, flow_run_ids: list[Any] | None = None) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flt = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
    if flow_run_ids is not None:
        flt.flow_run_id = ArtifactFilterFlowRunId(any_=list(flow_run_ids))
    with S.client(live.api_url) as c:
        return c.read_artifacts(artifact_filter=flt)


def task_runs(live: S.Served, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with S.client(live.api_url) as c:
        return c.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def root(live_prefect) -> Path:
    """The data root passed as the flows' ``data_root`` parameter: the worker's default one, the session's
    shared tiny-pipeline root (conftest ``pipeline_root``), where test_browser.py's run from the UI (the
    same request as ``first``) and test_pipeline.py's runs (the same two requests in-process) land too;
    whichever runs first computes a request, the others find its stages done."""
    return live_prefect.data_root


@pytest.fixture(scope="module")
def first(live_prefect, root):
    return run_deployment(live_prefect, "pipeline/pipeline",
                          {"preset": "smoke", "overrides": TINY, "data_root": str(root)})


@pytest.fixture(scope="module")
def second(first, live_prefect, root):
    return run_deployment(live_prefect, "pipeline/pipeline",
                          {"preset": "smoke", "overrides": SECOND, "data_root": str(root)})


def test_serve_deploys_every_deployment_to_the_process_pool(live_prefect):
    assert set(live_prefect.deployments) == DEPLOYMENTS
    with S.client(live_prefect.api_url) as c:
        assert c.read_work_pool(S.POOL).type == "process"
        for name in DEPLOYMENTS:
            dep = c.read_deployment_by_name(name)
            assert dep.work_pool_name == S.POOL and dep.enforce_parameter_schema, name
            # no pull section in prefect.yaml: the checkout that ran `prefect deploy` is the working directory
            (step,) = dep.pull_steps
            assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(S.project_dir())
        assert c.read_deployment_by_name("pipeline/pipeline").parameters == {"preset": "smoke"}
        # the UI form: typed parameters of the pipeline flow (the request is a nested pydantic model)
        schema = c.read_deployment_by_name("pipeline/pipeline").parameter_openapi_schema
    assert {"preset", "request", "overrides", "data_root"} <= set(schema["properties"])
    assert "PipelineRequest" in schema["definitions"]


def test_pipeline_deployment_runs_end_to_end(first, live_prefect, root):
    from imagegen.registry import list_datasets
    from imagegen.train.runs import list_runs

    children = subflows(live_prefect, first.id)
    assert {k: len(v) for k, v in children.items()} == {"curate": 1, "train": 1, "distill": 1, "evaluate": 2}
    assert all(r.state.is_completed() for rs in children.values() for r in rs)
    # artifacts: the pipeline report (markdown, images embedded), the stages' tables
    (report,) = artifacts(live_prefect, "pipeline-report", [first.id])
    assert report.type == "markdown" and "| metric | teacher | student |" in report.data
    assert report.data.count("](data:image/png;base64,") >= 5
    (counts,) = artifacts(live_prefect, "curate-stage-counts", [children["curate"][0].id])
    assert counts.type == "table"
    (metrics,) = artifacts(live_prefect, "train-metrics", [children["train"][0].id])
    assert metrics.type == "table"
    # the outputs are in the registries of the data root
    datasets = {d.id: d for d in list_datasets(root)}
    teacher = [r for r in list_runs(root) if r.card.get("family") == "flow"]
    student = [r for r in list_runs(root) if r.card.get("family") == "reflow"]
    assert len(teacher) == 1 and len(student) == 1
    assert teacher[0].card["status"] == student[0].card["status"] == "finished"
    assert teacher[0].card["dataset_id"] in datasets and datasets[teacher[0].card["dataset_id"]].name == "world-smoke"
    assert teacher[0].id in report.data and student[0].id in report.data
    # this request's report (test_pipeline.py's second request may have added its own to the shared root)
    reports = [p for p in (root / "reports").glob("*/report.md") if p.parent.name in report.data]
    assert len(reports) == 1


def test_bad_parameters_are_refused_by_the_server(live_prefect):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.exceptions import PrefectHTTPStatusError

    bad = {"pipeline/pipeline": [({"request": {"train": {"steps": -5}}}, "request.train.steps"),
                                 ({"preset": "huge"}, "preset"),
                                 ({"request": {"evaluate": {"n_samples": 1}}}, "request.evaluate.n_samples")],
           "train/train": [({"steps": "many"}, "steps"), ({"preset": "nope"}, "preset")],
           "import/import": [({"request": {"kind": "zip", "source": "x"}}, "request.kind")]}
    with S.client(live_prefect.api_url) as c:
        for name, cases in bad.items():
            dep = c.read_deployment_by_name(name)
            flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]))
            before = len(c.read_flow_runs(flow_run_filter=flt))
            for params, field in cases:
                with pytest.raises(PrefectHTTPStatusError) as err:
                    c.create_flow_run_from_deployment(dep.id, parameters=params)
                assert err.value.response.status_code == 409, (name, params)
                assert f"Validation failed for field '{field}'" in err.value.response.text, err.value.response.text
            assert len(c.read_flow_runs(flow_run_filter=flt)) == before, f"{name}: a refused run was created"


def test_benchmark_deployment_has_its_nightly_schedule(live_prefect):
    with S.client(live_prefect.api_url) as c:
        dep = c.read_deployment_by_name("benchmark/benchmark")
        others = [c.read_deployment_by_name(n) for n in DEPLOYMENTS - {"benchmark/benchmark"}]
    (sched,) = dep.schedules
    assert sched.active and sched.schedule.cron == "0 3 * * *" and sched.schedule.timezone == "UTC"
    assert dep.parameters["nfe_sweep"] == [1, 2, 4, 8]
    assert not any(d.schedules for d in others)


def test_benchmark_run_adds_a_leaderboard_version(first, live_prefect, root):
    from imagegen.train.runs import list_runs

    teacher = next(r.id for r in list_runs(root) if r.card.get("family") == "flow")
    before = artifacts(live_prefect, "leaderboard")
    run = run_deployment(live_prefect, "benchmark/benchmark",
                         {"runs": [teacher], "settings": BENCH_SETTINGS, "nfe_sweep": [], "data_root": str(root)})
    after = artifacts(live_prefect, "leaderboard")
    assert len(after) == len(before) + 1
    (new,) = [a for a in after if a.flow_run_id == run.id]
    rows = json.loads(new.data) if isinstance(new.data, str) else new.data  # a table artifact is stored as JSON
    assert new.type == "table" and [row["run_id"] for row in rows] == [teacher]
    (md,) = artifacts(live_prefect, "leaderboard-report", [run.id])
    board = Path(md.data.split("Folder: `", 1)[1].split("`", 1)[0])
    assert board.parent == root / "leaderboards" and (board / "leaderboard.parquet").is_file()


def test_second_pipeline_with_another_family_reuses_the_curated_shards(first, second, live_prefect, root):
    from imagegen.train.runs import list_runs

    runs = {r.card.get("family"): r for r in list_runs(root)}
    assert runs["ddpm"].card["status"] == "finished"
    assert runs["ddpm"].card["dataset_id"] == runs["flow"].card["dataset_id"]  # the same dataset id
    curate = [subflows(live_prefect, f.id)["curate"][0] for f in (first, second)]
    assert curate[0].id != curate[1].id
    from _helpers import stage_task_runs

    with S.client(live_prefect.api_url) as c:
        tasks = stage_task_runs(c, curate[1].id)
    names = {t.name.rsplit("-", 1)[0] for t in tasks}
    assert {"publish-world", "reference-clip", "download", "dedup", "filter", "recaption", "shard"} <= names
    ran = [(t.name, t.state.name) for t in tasks if t.state.name != "Cached"]
    assert not ran, f"curate tasks that executed the second time: {ran}"
    assert "distill" not in subflows(live_prefect, second.id)  # distill.method=null for the DDPM teacher


def test_gpu_concurrency_limit_covers_training(first, live_prefect):
    """One slot for every task run tagged ``gpu``; the train and distill tasks of a pipeline carry the tag."""
    with S.client(live_prefect.api_url) as c:
        limit = c.read_global_concurrency_limit_by_name(f"tag:{S.GPU_TAG}")  # what the task engine acquires
    assert limit.active and limit.limit == 1
    children = subflows(live_prefect, first.id)
    for stage in ("train", "distill"):
        tasks = [t for t in task_runs(live_prefect, children[stage][0].id) if t.name.rsplit("-", 1)[0] == stage]
        assert tasks, f"no {stage} task run in the {stage} subflow"
        assert all(S.GPU_TAG in t.tags for t in tasks), (
            f"the {stage} task runs carry tags {[t.tags for t in tasks]}: add tags=[\"gpu\"] to "
            f"@task(name=\"{stage}\") in tasks/{stage}.py")


def test_two_training_runs_take_turns_on_the_gpu_slot(first, live_prefect, root):
    """Two train deployment runs started together: their training tasks never overlap (one ``gpu`` slot)."""
    tiny_train = [o for o in TINY if o.startswith("train.") and not o.startswith("train.steps=")] + ["train.steps=20"]
    with S.client(live_prefect.api_url) as c:
        dep = c.read_deployment_by_name("train/train")
        created = [c.create_flow_run_from_deployment(dep.id, parameters={
            "dataset": "world-smoke", "overrides": [*tiny_train, f"train.seed={seed}"], "data_root": str(root)})
            for seed in (11, 12)]
    runs = [S.wait_for_flow_run(live_prefect.api_url, r.id, timeout=600) for r in created]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name, r.state.message) for r in runs]
    spans = []
    for r in runs:
        (task,) = [t for t in task_runs(live_prefect, r.id) if t.name.rsplit("-", 1)[0] == "train"]
        spans.append((task.start_time, task.end_time))
    (s0, e0), (s1, e1) = sorted(spans)
    assert e0 <= s1, f"the two training tasks overlapped: {spans}"


def test_serve_refuses_a_busy_port_and_names_the_alternative(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(S.ServeError, match=f"127.0.0.1:{port}.*--api-url http://127.0.0.1:{port}/api"):
            S.start_server(tmp_path / "home", port=port)
    assert S.deployment_names() == [d.split("/")[1] for d in ORDER]


def test_cli_serve_on_an_existing_server_deploys_runs_a_worker_and_stops_on_sigterm(live_prefect, tmp_path):
    """``imagegen serve --api-url URL``: no server of its own; pool, limit, deployments and a worker,
    stopped (worker included) by SIGTERM."""
    exe = Path(sys.executable).with_name("imagegen")
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    errors = tmp_path / "serve.err"  # progress, and the worker's own output
    with open(errors, "w") as err_fh:
        proc = subprocess.Popen([str(exe), "serve", "--api-url", live_prefect.api_url, "--data-root",
                                 str(tmp_path / "d")], env=env, stdout=subprocess.PIPE, stderr=err_fh, text=True,
                                start_new_session=True)
    try:
        line = proc.stdout.readline()  # the one stdout line, printed once everything is up
        assert line.startswith(f"Prefect UI: {live_prefect.ui_url} "), (line, errors.read_text()[-3000:])
        with S.client(live_prefect.api_url) as c:
            workers = {w.name for w in c.read_workers_for_work_pool(S.POOL)}
        assert {S.worker_name(), f"imagegen-{socket.gethostname()}-{proc.pid}"} <= workers  # the fixture's, this one
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:  # a failure above: stop it the polite way first (it stops its worker)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    err = errors.read_text()
    stops = [line for line in err.splitlines() if line.startswith("[serve] SIGTERM")]
    assert stops == [f"[serve] SIGTERM: stopping worker imagegen-{socket.gethostname()}-{proc.pid}"], err[-2000:]
    assert (tmp_path / "d" / "prefect" / "deploy.log").is_file()  # its PREFECT_HOME: <data root>/prefect


def test_sample_deployment_with_a_diffusers_model(live_prefect, root, tmp_path):
    """The ``sample`` deployment with ``request.model = diffusers:PATH`` (a tiny pipeline saved with
    save_pretrained), run by the worker: PNGs whose parameters chunk names the pipeline and its file
    hashes, and the grid artifact."""
    from _diffusers_tiny import tiny_sd_pipeline

    from imagegen.sample import read_parameters
    from models.hf_diffusers import resolve_spec

    spec = f"diffusers:{tiny_sd_pipeline(tmp_path / 'sd')}"
    out = tmp_path / "samples"
    run = run_deployment(live_prefect, "sample/sample", {
        "request": {"model": spec, "prompts": ["a red circle", "a cat"], "n": 2, "steps": 2, "guidance": 2.0,
                    "negative": "blurry", "seed": 3, "out": str(out)}, "data_root": str(root)})
    pngs = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 4 and (out / "grid.png").is_file()
    params = [read_parameters(p) for p in pngs]
    files = resolve_spec(spec)[1]["files"]
    for p in params:
        assert p["model"]["model"] == spec and p["model"]["pipeline"] == "StableDiffusionPipeline"
        assert p["model"]["files"] == files
        assert (p["steps"], p["guidance"], p["negative"], p["seed"]) == (2, 2.0, "blurry", 3)
    assert sorted({p["prompt"] for p in params}) == ["a cat", "a red circle"]
    assert len({p["image_seed"] for p in params}) == 4
    (grid,) = artifacts(live_prefect, "sample-grid", [run.id])
    assert grid.type == "markdown" and spec in grid.description


def test_import_deployment_registers_a_folder(live_prefect, root, tmp_path):
    """The ``import`` deployment (typed ImportConfig form) run by the worker on a folder with class
    sub-folders: a registry dataset with labels, one outcome per input row."""
    import pandas as pd
    from _helpers import gradient_png

    from imagegen.registry import get_dataset

    src = tmp_path / "photos"
    for i in range(6):
        d = src / ("cats" if i % 2 else "dogs")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(gradient_png(i))
    (src / "dogs" / "broken.png").write_bytes(b"not an image")
    run_deployment(live_prefect, "import/import",
                   {"request": {"kind": "folder", "source": str(src), "name": "photos-flow"}, "data_root": str(root)})
    ds = get_dataset(root, "photos-flow")
    manifest = pd.read_parquet(ds.path / "manifest.parquet")
    assert len(manifest) == 6 and sorted(manifest["label"].unique()) == ["cats", "dogs"]
    outcomes = pd.read_parquet(ds.path / "accounting.parquet")["outcome"].value_counts().to_dict()
    assert outcomes == {"kept": 6, "skipped:undecodable_image": 1}
