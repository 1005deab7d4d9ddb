"""The train flow through a real Prefect server, its artifacts, reuse, and ``imagegen train`` / ``imagegen runs``.

A tiny dataset is built directly (real shards, manifest, card, registry name; no curate run) and
a tiny U-Net flow-matching model is trained on it for a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from _helpers import gradient_png, flow_artifacts, artifact_data

DATASET = "tiny-shapes"
DATASET_ID = "0123456789abcdef"  # any folder name: the registry takes every complete folder as a dataset
SHAPES = ("circle", "square")
# a tiny class-conditional U-Net at 16 px over the smoke preset
TINY = ["train.model.image_size=16",
        'train.model.net_overrides={"model_channels":16,"norm_groups":8,"head_channels":16}',
        "train.batch_size=8", "train.warmup_steps=0", "train.ckpt_every=3", "train.log_every=1",
        "train.epoch_batches=4", "train.shuffle_buffer=16", "train.sample_count=4", "train.sample_steps=2",
        f"train.label_keywords={json.dumps(list(SHAPES))}"]


def build_dataset(root: Path, name: str = DATASET, dataset_id: str = DATASET_ID, n: int = 32,
                  per_shard: int = 8) -> Path:
    """A registered dataset as curate leaves one: <root>/datasets/<id>/{shards/*.tar, manifest.parquet,
    card.json} (the card, written last, marks the folder complete) and a name in names.json."""
    from imagegen.artifacts import write_json_atomic
    from imagegen.registry import register_name
    from imagegen.stages.shard import ShardConfig, plan_shards, write_shards_from_plan

    path = root / "datasets" / dataset_id
    samples = {f"{i:04d}": {"key": f"{i:04d}", "image": gradient_png(i), "ext": "png",
                            "caption": f"a {SHAPES[i % 2]} in gradient {i}"} for i in range(n)}
    cfg = ShardConfig(target_shard_size=per_shard)
    plan = plan_shards(samples, cfg)
    infos = write_shards_from_plan(plan, samples.__getitem__, path / "shards", cfg)
    pd.DataFrame([{"key": k, "shard": infos[s].name, "caption": samples[k]["caption"]}
                  for s, keys in enumerate(plan) for k in keys]).to_parquet(path / "manifest.parquet", index=False)
    write_json_atomic(path / "card.json", {"id": dataset_id, "name": name, "created_unix": time.time(),
                                           "stage_ids": {}, "shards": [i.name for i in infos],
                                           "counts": {"shard": {"samples": n, "shards": len(infos)}}})
    register_name(root, name, dataset_id)
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    build_dataset(root)
    return root


def _flow_run(root: Path):
    from flows.train import train_flow

    state = train_flow(overrides=TINY, dataset=DATASET, family="flow", steps=6, data_root=str(root),
                       return_state=True)
    assert state.is_completed(), state
    return state.state_details.flow_run_id, state.result()


@pytest.fixture(scope="module")
def flow_runs(prefect_server, data_root):
    t0 = time.perf_counter()
    first_id, first = _flow_run(data_root)
    t1 = time.perf_counter()
    run_dir = Path(first["run_dir"])
    before = {"metrics": (run_dir / "metrics.parquet").read_bytes(),
              "checkpoints": sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").iterdir())}
    second_id, second = _flow_run(data_root)
    print(f"train flow: first run {t1 - t0:.1f}s ({first['steps_per_s']:.1f} steps/s), "
          f"rerun {time.perf_counter() - t1:.1f}s", file=sys.stderr)
    return data_root, (first_id, first), (second_id, second), before


def test_flow_trains_the_run(flow_runs):
    root, (_, s), _, _ = flow_runs
    run_dir = Path(s["run_dir"])
    assert run_dir.parent == root / "runs" and run_dir.name == s["run_id"]
    assert s["finished"] and s["step"] == 6 and not s["reused"] and s["dataset_id"] == DATASET_ID
    json.dumps(s)  # the flow's result is JSON-able
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["step"].tolist() == list(range(1, 7)) and metrics["loss/model"].notna().all()
    assert (run_dir / "loss_curve.png").is_file() and Path(s["loss_curve"]) == run_dir / "loss_curve.png"
    assert s["samples"] and all(Path(p).is_file() and Path(p).parent == run_dir / "samples" for p in s["samples"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    card = json.loads((run_dir / "card.json").read_text())
    assert card["status"] == "finished" and card["config"]["model"]["num_classes"] == len(SHAPES)


def test_flow_publishes_artifacts(flow_runs):
    _, (flow_run_id, s), _, _ = flow_runs
    table = flow_artifacts(flow_run_id, "train-metrics")
    md = flow_artifacts(flow_run_id, "train-summary")
    assert len(table) == 1 and len(md) == 1
    (row,) = artifact_data(table[0])
    assert row["run_id"] == s["run_id"] and row["dataset_id"] == DATASET_ID and row["reused"] is False
    assert row["step"] == row["steps"] == 6 and row["loss/model"] == pytest.approx(s["last_losses"]["model"])
    assert row["steps_per_s"] > 0
    text = md[0].data
    assert s["run_id"] in text and text.count("data:image/png;base64,") == 2  # loss curve + last sample grid
    progress = [a for a in flow_artifacts(flow_run_id) if a.type == "progress"]
    assert [a.key for a in progress] == ["train-progress"]
    assert float(artifact_data(progress[0])) == pytest.approx(100.0)


def test_rerun_reuses_the_finished_run(flow_runs):
    _, (_, first), (second_id, second), before = flow_runs
    assert second["run_id"] == first["run_id"] and second["reused"] is True
    assert second["last_losses"] == first["last_losses"] and second["step"] == 6
    run_dir = Path(second["run_dir"])
    assert (run_dir / "metrics.parquet").read_bytes() == before["metrics"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").iterdir()) == before["checkpoints"]
    (row,) = artifact_data(flow_artifacts(second_id, "train-metrics")[0])
    assert row["reused"] is True and row["run_id"] == first["run_id"]


# ------------------------------------------------------------------------------------------ command line


def _imagegen(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("imagegen")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _train_args(root: Path, steps: int, tiny: list[str] = TINY) -> list[str]:
    args = ["train", "--data-root", str(root), "--dataset", DATASET, "--family", "flow", "--steps", str(steps)]
    for o in tiny:
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def cli_env(prefect_server) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_cli_train_prints_the_run_id(data_root, cli_env):
    plain = _imagegen([*_train_args(data_root, 4), "--no-prefect"], cli_env)
    assert plain.returncode == 0, plain.stderr[-4000:]
    run_id = plain.stdout.strip()
    assert len(plain.stdout.strip().splitlines()) == 1
    run_dir = data_root / "runs" / run_id
    assert run_dir.is_dir() and json.loads((run_dir / "card.json").read_text())["summary"]["step"] == 4
    assert "[train] step 4/4" in plain.stderr
    as_json = _imagegen([*_train_args(data_root, 4), "--no-prefect", "--json"], cli_env)
    assert as_json.returncode == 0, as_json.stderr[-4000:]
    lines = as_json.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["run_id"] == run_id and summary["reused"] is True and summary["run_dir"] == str(run_dir)
    # runs list / show
    listing = _imagegen(["runs", "list", "--json", "--data-root", str(data_root)], cli_env)
    assert listing.returncode == 0, listing.stderr[-4000:]
    runs = {r["id"]: r for r in json.loads(listing.stdout.strip().splitlines()[-1])["runs"]}
    assert runs[run_id]["status"] == "finished" and runs[run_id]["step"] == runs[run_id]["steps"] == 4
    assert runs[run_id]["dataset_id"] == DATASET_ID and runs[run_id]["family"] == "flow"
    show = _imagegen(["runs", "show", run_id[:8], "--json", "--data-root", str(data_root)], cli_env)
    assert show.returncode == 0, show.stderr[-4000:]
    shown = json.loads(show.stdout.strip().splitlines()[-1])
    assert shown["id"] == run_id and Path(shown["checkpoint"]).parent == run_dir / "checkpoints"


@pytest.mark.slow
def test_cli_train_through_prefect(flow_runs, cli_env):
    root, (_, first), _, _ = flow_runs
    proc = _imagegen(_train_args(root, 6), cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines() == [first["run_id"]], proc.stdout[-2000:]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        flow_runs_ = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))
    assert len(flow_runs_) >= 3 and all(r.state.is_completed() for r in flow_runs_)


BAD = {
    "unknown family": (["--family", "nope"], "unknown model family 'nope'"),
    "unknown dataset": (["--dataset", "no-such-dataset"], "no dataset 'no-such-dataset'"),
    "unknown sampler": (["--set", "train.sample_sampler=zigzag"], "unknown sampler 'zigzag'"),
    "dit patch size": (["--set", "train.model.net=dit", "--set", "train.model.net_overrides.patch_size=3"],
                       "image_size 16 is not divisible by patch_size 3"),
    "guidance unconditional": (["--set", "train.model.conditioning=none", "--set", "train.label_keywords=[]",
                                "--set", "train.sample_guidance=3"], "sample_guidance=3.0 needs a conditional model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_refuses_bad_input(case, data_root, capsys):
    from imagegen.cli import main

    extra, message = BAD[case]
    runs_before = sorted(p.name for p in (data_root / "runs").glob("*")) if (data_root / "runs").exists() else []
    # the DiT case leaves out the tiny U-Net's net_overrides (a DiT refuses U-Net fields first)
    tiny = [o for o in TINY if not (case == "dit patch size" and o.startswith("train.model.net_overrides="))]
    code = main([*_train_args(data_root, 6, tiny), *extra, "--no-prefect"])
    out = capsys.readouterr()
    assert code == 2
    assert message in out.err and out.err.startswith("imagegen train:"), out.err
    assert out.out == ""
    runs_after = sorted(p.name for p in (data_root / "runs").glob("*")) if (data_root / "runs").exists() else []
    assert runs_after == runs_before


@pytest.mark.slow
def test_cli_refusal_in_a_subprocess(data_root, cli_env):
    proc = _imagegen([*_train_args(data_root, 6), "--dataset", "no-such-dataset", "--no-prefect"], cli_env)
    assert proc.returncode == 2 and "no dataset 'no-such-dataset'" in proc.stderr and proc.stdout == ""


def test_build_request_applies_named_parameters_last():
    from imagegen.requests import build_train_request as build_request

    req = build_request("smoke", overrides=["train.steps=50", "train.warmup_steps=0", "dataset=other"], dataset="123", steps=7,
                        nproc=2, family="ddpm")
    assert req.dataset == "123" and req.train.steps == 7 and req.nproc == 2 and req.train.family == "ddpm"
    # a given request is the base; switching family keeps only fields the new family has
    again = build_request(None, request=req, family="flow")
    assert again.train.family == "flow" and again.train.steps == 7 and "prediction" not in again.train.model
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        build_request("nope")
