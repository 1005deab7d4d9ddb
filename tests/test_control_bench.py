"""The control benchmark (imagegen/evaluate/control.py): its scores read the world's ground truth
(the held-out scenes themselves score near the ceiling, noise does not), the evaluation metric
``control`` on a base run and its ControlNet run, their leaderboard rows with the right
directions, refusals before work, and (slow) the control-benchmark flow on a real Prefect server."""

from __future__ import annotations

import pytest
import torch

from _helpers import TINY_UNET, eval_world_root, tiny_text_run
from imagegen.evaluate import control as C

SETTINGS = {"control_scenes": 8, "steps": 2, "batch_size": 8, "n_resamples": 20}


def test_the_scenes_themselves_score_near_the_ceiling_and_noise_does_not():
    x, scenes = C.held_out_scenes(16, 32)
    truth = C.layout_scores(C.world_uint8(x, 64), scenes).means()
    noise = C.layout_scores(C.world_uint8(torch.rand_like(x) * 2 - 1, 64), scenes).means()
    assert truth["mean IoU"] > 0.8 and truth["IoU>=0.5"] > 0.9 and truth["position"] == 1.0
    assert noise["mean IoU"] < 0.4 and noise["IoU>=0.5"] < 0.2


def test_inpaint_targets_lie_in_a_free_half():
    _, scenes = C.held_out_scenes(24, 16)
    targets = C.inpaint_targets(scenes)
    assert len(targets) >= 5
    for i, half, obj in targets:
        m = C.half_mask(half, 64)
        assert m.sum() == 64 * 32
        for o in scenes[i].objects:  # no ground-truth object reaches the regenerated half
            x0, y0, x1, y1 = o["box"]
            assert not m[y0:y1, x0:x1].any(), (i, half, o)
        assert obj["class"] in ("circle", "square", "triangle", "star", "cross")
    assert C.in_half([40, 0, 60, 10], "right", 64) and not C.in_half([40, 0, 60, 10], "left", 64)


@pytest.fixture(scope="module")
def control_root(tmp_path_factory):
    """A text-conditioned flow base (4 steps) and a ControlNet on its detector boxes (4 steps)."""
    from imagegen.train.runs import train_run

    root = tmp_path_factory.mktemp("control-bench")
    eval_world_root(root)
    base = tiny_text_run(root, "flow", steps=4)
    cn = train_run({"dataset": "world-tiny", "train": {
        "family": "controlnet", "model": {**TINY_UNET, "conditioning": "text", "text_encoder": "world",
                                          "base": f"run:{base}", "signal": "boxes"},
        "steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "ckpt_every": 4, "epoch_batches": 2,
        "shuffle_buffer": 16, "sample_count": 2, "sample_steps": 2}}, root)["run_id"]
    return {"root": root, "base": base, "controlnet": cn}


@pytest.mark.slow  # two tiny training runs and their evaluations: ~70 s on the shared cores
def test_control_metric_rows_and_leaderboard(control_root):
    from imagegen import leaderboard as L
    from imagegen.benchmark import check_plan, control_plan, run_plan

    root = control_root["root"]
    jobs = control_plan(root, control_root["base"], settings=SETTINGS)  # finds the ControlNet by its base
    assert [j.run for j in jobs] == [control_root["base"], control_root["controlnet"]]
    assert all(j.metrics == ("control",) for j in jobs)
    check_plan(jobs, root)
    summaries = run_plan(jobs, root)
    base, cn = ({k: v for k, v in s["metrics"].items()} for s in summaries)
    assert base["Control inpaint unmasked max error"] == 0.0  # a pixel family keeps the known pixels exactly
    assert 0.0 <= base["Control inpaint GenEval"] <= 1.0
    assert {"Control SDEdit distance s=0.25", "Control SDEdit target s=0.75"} <= set(base)
    assert base["Control SDEdit distance s=0.25"] < base["Control SDEdit distance s=0.75"]
    for name in ("mean IoU", "IoU>=0.5", "position", "counting"):
        assert 0.0 <= cn[f"Control {name}"] <= 1.0 and f"Control {name} (no control)" in cn
    assert "Control inpaint GenEval" not in cn
    assert summaries[1]["intervals"]["Control mean IoU"][0] <= cn["Control mean IoU"]

    board = L.build_leaderboard(root, summaries, {"benchmark": "control"})
    assert board["main_metric"] == "Control mean IoU" and board["lower_is_better"] is False
    assert L.lower_is_better("Control inpaint unmasked max error") and L.lower_is_better("Control SDEdit distance s=0.5")
    assert not L.lower_is_better("Control inpaint GenEval") and not L.lower_is_better("Control position (no control)")
    rows = {r["run_id"]: r for r in board["rows"]}
    assert rows[control_root["controlnet"]]["family"] == "controlnet"
    assert rows[control_root["base"]]["Control inpaint unmasked max error"] == 0.0
    md = (root / "leaderboards" / board["leaderboard_id"] / "leaderboard.md").read_text()
    assert "Control mean IoU" in md and "higher is better" in md
    again = run_plan(control_plan(root, control_root["base"], settings=SETTINGS), root)
    assert all(s["reused"] for s in again) and [s["eval_id"] for s in again] == [s["eval_id"] for s in summaries]


@pytest.mark.slow  # shares the runs of the test above
def test_refused_before_work(control_root, tmp_path):
    from imagegen.benchmark import control_plan
    from imagegen.evaluate.run import EvalRequest, check_request

    root = control_root["root"]
    with pytest.raises(ValueError, match=f"not a control of base run {control_root['controlnet']}"):
        control_plan(root, control_root["controlnet"], controls=[control_root["base"]])
    with pytest.raises(ValueError, match="leaves it out"):
        control_plan(root, control_root["base"], settings={"metrics": ["fid"]})
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(ValueError, match="generates from a run"):
        check_request(EvalRequest(folder=str(tmp_path / "imgs"), metrics=["control"]), root)


@pytest.mark.slow
def test_control_benchmark_flow(prefect_server, control_root):
    from flows.control import control_benchmark_flow

    root = control_root["root"]
    state = control_benchmark_flow(control_root["base"], settings=SETTINGS, data_root=str(root), return_state=True)
    assert state.is_completed(), state
    out = state.result()
    assert {r["run_id"] for r in out["rows"]} == {control_root["base"], control_root["controlnet"]}
    assert out["main_metric"] == "Control mean IoU" and not out["failed"]
