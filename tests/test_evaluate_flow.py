"""The evaluate flow through a real Prefect server, its artifacts, and ``imagegen evaluate``.

A tiny text-conditioned flow-matching run (4 steps, untrained in effect) is evaluated on a world
dataset whose reference CLIP is a tiny random one, with small settings: this checks the plumbing
(summary, artifacts, command line, refusals), not the metrics, which tests/test_evaluate_run.py,
test_fid.py, test_clipscore.py and test_geneval.py measure.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _helpers import eval_world_root, tiny_text_run, flow_artifacts, artifact_data


# 32 images at 4 Euler steps, KID on 10 subsets of 16, GenEval on the first 6 world prompts x 1 image
SMALL = ["n_samples=32", "steps=4", "kid_subsets=10", "kid_subset_size=16", "geneval_max_prompts=6",
         "geneval_per_prompt=1", "batch_size=32"]
HESSEL = "CLIPScore (Hessel et al. 2021: 2.5*max(cos,0))"


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("evaluate-flow")
    eval_world_root(r)
    return r


@pytest.fixture(scope="module")
def run_id(root) -> str:
    return tiny_text_run(root, "flow", steps=4)


@pytest.fixture(scope="module")
def flow_run(prefect_server, root, run_id):
    from flows.evaluate import evaluate_flow

    # a unique id prefix names the run
    state = evaluate_flow(run=run_id[:8], overrides=SMALL, data_root=str(root),
                                              return_state=True)
    assert state.is_completed(), state
    return state.state_details.flow_run_id, state.result()


def _fd(metrics: dict) -> str:
    (name,) = [k for k in metrics if k.startswith("FD-CLIP-")]
    return name


def _evals(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "evals").iterdir()) if (root / "evals").is_dir() else []


def test_flow_evaluates_the_run(flow_run, run_id):
    _, s = flow_run
    json.dumps(s)  # the flow's result is JSON-able
    assert s["run_id"] == run_id and s["family"] == "flow" and s["sampler"] == "euler"
    assert s["steps"] == 4 and s["nfe"] == 4 and s["guidance"] == 1.0 and s["n_samples"] == 32
    fd = _fd(s["metrics"])
    assert "FID" not in s["metrics"], "a distance on CLIP features is never called FID"
    assert {fd, "KD-" + fd[3:], HESSEL, "GenEval overall"} <= set(s["metrics"]) and s["skipped"] == {}
    assert len(list((Path(s["path"]) / "samples").glob("*.png"))) == 32
    rows = pd.read_parquet(s["metrics_file"])
    assert set(rows["metric"]) == set(s["metrics"]) and (rows["run_id"] == run_id).all()


def test_flow_publishes_artifacts(flow_run):
    flow_run_id, s = flow_run
    (table,) = flow_artifacts(flow_run_id, "evaluate-metrics")
    got = artifact_data(table)
    assert [r["metric"] for r in got] == list(s["metrics"])
    assert [r["value"] for r in got] == pytest.approx(list(s["metrics"].values()))
    for r in got:
        assert (r["run"], r["family"], r["sampler"], r["steps"], r["NFE"], r["guidance"]) == \
            (s["run_id"], "flow", "euler", 4, 4, 1.0)
    assert {r["metric"] for r in got if r["ci_low"] is not None} == set(s["intervals"])  # each row's interval
    assert all(r["ci_low"] <= r["ci_high"] for r in got if r["ci_low"] is not None)
    n = {r["metric"]: r["n"] for r in got}
    assert n[_fd(s["metrics"])] == n[HESSEL] == 32 and n["GenEval overall"] == 6  # 6 prompts x 1 image
    (md,) = flow_artifacts(flow_run_id, "evaluate-summary")
    text = md.data
    assert s["eval_id"] in text and s["run_id"] in text and "## Skipped" not in text
    for name, value in s["metrics"].items():
        assert f"| {name} | {value:.6g} |" in text
    # one grid: the first 16 generated images, 8 per row, each scaled to 64 px
    (uri,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    grid = Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB")
    assert grid.size == (8 * 64, 2 * 64)
    for i in (0, 15):
        with Image.open(Path(s["path"]) / "samples" / f"{i:05d}.png") as im:
            want = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.NEAREST))
        r, c = divmod(i, 8)
        assert np.array_equal(np.asarray(grid.crop((c * 64, r * 64, c * 64 + 64, r * 64 + 64))), want)


def test_markdown_lists_skipped_metrics(root):
    """An unconditional run: CLIPScore and GenEval are skipped, each with its reason, in the summary."""
    from imagegen.evaluate.run import run_evaluation
    from imagegen.report import eval_metrics_rows as metrics_rows
    from imagegen.report import evaluate_markdown
    from imagegen.requests import build_eval_request as build_request
    from imagegen.train.runs import train_run

    from _helpers import TINY_UNET

    uncond = train_run({"dataset": "world-tiny", "train": {"family": "flow", "model": TINY_UNET, "steps": 1,
                                                           "batch_size": 4, "ckpt_every": 1}}, root)["run_id"]
    req = build_request(run=uncond, overrides=[*SMALL, 'metrics=["clipscore","geneval"]', "n_samples=4"])
    s = run_evaluation(req, root)
    assert s["metrics"] == {} and set(s["skipped"]) == {"clipscore", "geneval"} and metrics_rows(s) == []
    text = evaluate_markdown(s, req)
    assert "## Skipped" in text and "- **clipscore**: the model is unconditional" in text
    assert f"- **geneval**: GenEval prompts are text; run {uncond} is none-conditioned" in text
    assert text.count("data:image/png;base64,") == 1  # its 4 generated images


# ------------------------------------------------------------------------------------------ command line


def _cli(root: Path, *args: str) -> list[str]:
    return ["evaluate", *args, "--data-root", str(root)]


def test_cli_json_reuses_the_flows_evaluation(flow_run, root, run_id, capsys):
    from imagegen.cli import main

    _, s = flow_run
    first = Path(s["path"]) / "samples" / "00000.png"
    mtime = first.stat().st_mtime_ns
    assert main(_cli(root, "--run", run_id, *_sets(SMALL), "--no-prefect", "--json")) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 1, out.out[-2000:]
    got = json.loads(lines[0])
    assert got["eval_id"] == s["eval_id"] and got["path"] == s["path"]
    assert got["metrics"] == pytest.approx(s["metrics"])
    assert got["nfe"] == 4, "a reused generated set still reports its NFE"
    assert first.stat().st_mtime_ns == mtime, "the generated set is reused, not drawn again"
    # without --json: one "name: value" line per metric; --metrics picks the metrics
    assert main(_cli(root, "--run", run_id[:8], "--metrics", "fid,clipscore", *_sets(SMALL), "--no-prefect")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.rsplit(": ", 1)[0] for line in lines]
    assert names == [_fd(s["metrics"]), HESSEL, "CLIPScore (torchmetrics: max(mean 100*cos, 0))"]
    # the same images and seed: the same FD as the full evaluation
    assert float(lines[0].rsplit(": ", 1)[1]) == pytest.approx(s["metrics"][names[0]], rel=1e-5)


def test_cli_through_prefect(flow_run, root, run_id, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from imagegen.cli import main

    _, s = flow_run
    assert main(_cli(root, "--run", run_id, *_sets(SMALL), "--json")) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["eval_id"] == s["eval_id"] and got["metrics"] == pytest.approx(s["metrics"])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["evaluate"])))
    assert len(runs) >= 2 and all(r.state.is_completed() for r in runs)


def test_cli_evaluates_a_folder(flow_run, root, capsys, monkeypatch):
    """The generated set as a folder (a relative path, resolved by the command): the same FD and CLIPScore."""
    from imagegen.cli import main

    _, s = flow_run
    monkeypatch.chdir(Path(s["path"]))
    assert main(_cli(root, "--folder", "samples", "--metrics", "fid,clipscore", "--set", "reference=world-tiny",
                     "--set", "batch_size=32", "--no-prefect", "--json")) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fd = _fd(s["metrics"])
    assert got["run_id"] is None and got["n_samples"] == 32
    assert got["metrics"][fd] == pytest.approx(s["metrics"][fd], rel=1e-6)
    assert got["metrics"][HESSEL] == pytest.approx(s["metrics"][HESSEL], rel=1e-6)
    card = json.loads((Path(got["path"]) / "card.json").read_text())
    assert card["request"]["folder"] == str(Path(s["path"]) / "samples")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "empty").mkdir()
    (d / "mixed").mkdir()
    Image.new("RGB", (16, 16)).save(d / "mixed" / "a.png")
    Image.new("RGB", (20, 20)).save(d / "mixed" / "b.png")
    (d / "one").mkdir()
    Image.new("RGB", (16, 16)).save(d / "one" / "a.png")
    good = json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                       "prompt": "a photo of a circle"})
    (d / "prompts.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    return {k: d / k for k in ("empty", "mixed", "one", "prompts.jsonl")}


BAD = {
    "unknown run": (lambda b, r: ["--run", "nope-nope"], "no training run 'nope-nope'"),
    "empty folder": (lambda b, r: ["--folder", str(b["empty"]), "--set", "reference=world-tiny"], "holds no images"),
    "mixed sizes": (lambda b, r: ["--folder", str(b["mixed"]), "--set", "reference=world-tiny"],
                    "a.png is 16x16, b.png is 20x20"),
    "folder without reference": (lambda b, r: ["--folder", str(b["one"]), "--metrics", "fid"], "needs reference="),
    "malformed prompt file": (lambda b, r: ["--run", r, "--metrics", "geneval", "--set",
                                            f"geneval_prompts={b['prompts.jsonl']}"], "line 3"),
    "unknown metric": (lambda b, r: ["--run", r, "--metrics", "fid,fvd"], "invalid parameters"),
    "unknown sampler": (lambda b, r: ["--run", r, "--set", "sampler=zigzag"], "unknown sampler 'zigzag'"),
    "unknown reference": (lambda b, r: ["--run", r, "--set", "reference=no-such-dataset"], "no-such-dataset"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_refuses_bad_input(case, root, run_id, bad_inputs, capsys):
    from imagegen.cli import main

    args, message = BAD[case]
    before = _evals(root)
    code = main(_cli(root, *args(bad_inputs, run_id), *_sets(SMALL), "--no-prefect"))
    out = capsys.readouterr()
    assert code == 2
    assert out.err.startswith("imagegen evaluate:") and message in out.err, out.err[-3000:]
    if case == "malformed prompt file":
        assert str(bad_inputs["prompts.jsonl"]) in out.err
    assert out.out == ""
    assert _evals(root) == before, "nothing is written before the input is checked"


def test_cli_wants_exactly_one_source(root, capsys):
    from imagegen.cli import main

    for args in ([], ["--run", "a", "--folder", "b"]):
        with pytest.raises(SystemExit) as exc:
            main(_cli(root, *args))
        assert exc.value.code == 2
    assert "--run" in capsys.readouterr().err


def test_build_request_applies_named_parameters_last():
    from imagegen.evaluate.run import EvalRequest
    from imagegen.requests import build_eval_request as build_request

    req = build_request(run="123", overrides=["steps=8", "run=other", 'metrics=["fid"]'])
    assert req.run == "123" and req.steps == 8 and req.metrics == ("fid",)
    base = EvalRequest(folder="/x", reference="d")
    assert build_request(base) is base
    again = build_request(base, overrides=["n_samples=10"])
    assert again.folder == "/x" and again.reference == "d" and again.n_samples == 10
    with pytest.raises(ValueError, match="exactly one of run"):
        build_request(base, run="abc")
