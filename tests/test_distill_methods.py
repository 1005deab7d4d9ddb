"""DMD and consistency training (iCT) in ``imagegen distill``, and the one NFE table with cost
(teacher network evaluations, student steps, seconds) next to the other methods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _helpers import register_world_dataset
from imagegen.distill import DistillRequest, distill, distill_cost, nfe_table, nfe_table_markdown
from imagegen.train.runs import RunError, get_run, train_run
from imagegen.train.trainer import TrainConfig
from models.checkpoint import load_family

NET = {"net": "unet", "net_size": "tiny", "image_size": 16,
       "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"family": "flow", "model": {**NET, "conditioning": "none"}, "steps": 10, "batch_size": 8,
                          **kw})


def test_cost_of_each_method():
    """Teacher network evaluations per method, from what each loss calls (see distill_cost)."""
    t = _cfg()
    rounds = [{"seconds": 2.0}, {"seconds": 3.0}]

    def cost(method: str, rounds=rounds[:1], **kw: Any) -> dict:
        return distill_cost(DistillRequest(teacher="t", method=method, steps=50, **kw), t, rounds, pairs_seconds=4.0)

    # progressive: 2 DDIM teacher steps per sample and step, over 2 rounds
    assert cost("progressive", rounds, start_steps=16, target_steps=4) == {
        "teacher_calls": 2 * 8 * 100, "student_steps": 100, "train_seconds": 9.0}
    # reflow: the pairs only, Heun 2N - 1 evaluations each (unconditional: no CFG doubling)
    assert cost("reflow", pairs=30, pair_steps=10)["teacher_calls"] == 30 * 19
    assert cost("reflow", pairs=30, pair_steps=10, pair_sampler="euler")["teacher_calls"] == 300
    # consistency: one Heun step (2 evaluations) per sample and step
    assert cost("consistency")["teacher_calls"] == 2 * 8 * 50
    # dmd: the pairs plus one real-score evaluation per sample and step
    assert cost("dmd", pairs=30, pair_steps=10)["teacher_calls"] == 30 * 19 + 8 * 50
    # ict: no teacher at all
    assert cost("ict") == {"teacher_calls": 0, "student_steps": 50, "train_seconds": 6.0}
    # a conditional teacher with CFG: both branches count
    text = TrainConfig(family="flow", model={**NET, "conditioning": "class"}, steps=10, batch_size=8,
                       label_keywords=("circle", "square"), sample_guidance=3.0)
    assert distill_cost(DistillRequest(teacher="t", method="dmd", steps=50, pairs=30, pair_steps=10,
                                       teacher_guidance=2.0), text, [{}])["teacher_calls"] == 30 * 19 * 2 + 8 * 50 * 2


def test_one_nfe_table_over_several_distillations():
    def summary(method: str, teacher: str, student: str, rows: list[tuple[str, int, float]]) -> dict:
        return {"method": method, "teacher_run": teacher, "student_run": student,
                "report": {"rows": [{"model": m, "steps": n, "nfe": n, "mse_to_reference": e, "teacher_calls": 7,
                                     "student_steps": 5, "train_seconds": 1.5} for m, n, e in rows]}}

    df = nfe_table([summary("reflow", "flowrun", "s1", [("teacher", 50, 0.0), ("student_1", 1, 0.2)]),
                    summary("dmd", "flowrun", "s2", [("teacher", 50, 0.0), ("student_1", 1, 0.1)]),
                    summary("ict", "edmrun", "s3", [("teacher", 50, 0.0), ("student_1", 1, 0.3),
                                                    ("student_1", 2, 0.25)])])
    assert df["method"].tolist() == ["teacher", "reflow", "dmd", "teacher", "ict", "ict"]  # each teacher once
    assert df.loc[df["method"] == "dmd", "run_id"].item() == "s2"
    md = nfe_table_markdown(df)
    assert md.count("\n") == len(df) + 1 and "| dmd | `flowrun` | 1 | 0.10000 | 7 | 5 | 1.5 |" in md


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("distill-methods")
    register_world_dataset(r, n=32, per_shard=8)
    return r


def teacher(root: Path, family: str, steps: int, **model: Any) -> str:
    req = {"dataset": "world-tiny", "train": {
        "family": family, "model": {**NET, **model}, "steps": steps, "batch_size": 8, "lr": 2e-3,
        "warmup_steps": min(10, steps), "ema_decay": 0.0, "ckpt_every": steps, "log_every": 10,
        "epoch_batches": 4, "shuffle_buffer": 32, "sample_count": 2, "sample_steps": 2, "seed": 2}}
    return train_run(req, root)["run_id"]


@pytest.mark.slow
def test_dmd_and_ict_through_distill_with_their_cost(root):
    flow = teacher(root, "flow", 60, t_sampling="uniform")
    dmd = distill({"teacher": flow, "method": "dmd", "pairs": 16, "pair_steps": 4, "pair_sampler": "euler",
                   "steps": 6, "lr": 1e-4, "report_count": 2, "report_nfe": [1, 2, 4]}, root)
    s = load_family(dmd["student_checkpoint"])
    assert s.name == "dmd" and s.default_steps == 1 and dmd["rounds"][0]["steps"] == 1
    rows = dmd["report"]["rows"]
    assert [(r["model"], r["nfe"]) for r in rows] == [("teacher", 50), ("teacher", 1), ("teacher", 2),
                                                      ("teacher", 4), ("student_1", 1)]  # a one-step generator
    assert rows[-1]["teacher_calls"] == 16 * 4 + 8 * 6 == dmd["cost"]["teacher_calls"]
    assert rows[-1]["student_steps"] == 6 and rows[-1]["train_seconds"] > 0
    assert rows[0]["student_steps"] == 60  # the teacher row: its own training
    assert get_run(root, dmd["student_run"]).card["dataset_id"] == dmd["dataset_id"]  # trained on the pairs

    edm = teacher(root, "edm", 10)
    ict = distill({"teacher": edm, "method": "ict", "steps": 6, "lr": 1e-4, "student_steps": 2,
                   "report_count": 2, "report_nfe": [1, 2]}, root)
    s = load_family(ict["student_checkpoint"])
    assert s.name == "ict" and s.default_steps == 2
    card = get_run(root, ict["student_run"]).card
    assert "teacher" not in card["config"]["model"] and card["dataset_id"] == get_run(root, edm).card["dataset_id"]
    assert card["config"]["model"]["curriculum_steps"] == 6
    rows = [r for r in ict["report"]["rows"] if r["model"] != "teacher"]
    assert [r["nfe"] for r in rows] == [1, 2] and all(r["teacher_calls"] == 0 for r in rows)
    # trained from scratch: its weights are not the teacher's
    t = load_family(get_run(root, edm).checkpoint)
    assert not torch.equal(next(iter(s.net.parameters())), next(iter(t.net.parameters())))
    table = nfe_table([dmd, ict])
    teachers = table[table["method"] == "teacher"]
    assert set(table["method"]) == {"teacher", "dmd", "ict"} and not teachers.duplicated(["teacher_run", "steps"]).any()
    assert sorted(teachers.loc[teachers["steps"] == 50, "teacher_run"]) == sorted([flow, edm])
    with pytest.raises(RunError, match="ict distillation needs an EDM run"):
        distill({"teacher": flow, "method": "ict"}, root)
    with pytest.raises(RunError, match="dmd distillation needs a flow-matching run"):
        distill({"teacher": edm, "method": "dmd"}, root)


def test_consistency_cfg_runs_both_teacher_branches_in_one_call():
    """With teacher_guidance, each teacher denoiser call of consistency distillation is one doubled
    batch (cond + uncond): Heun's 2 calls evaluate 2 x 2B images, as distill_cost counts; D equals
    F_u + w (F_c - F_u) computed from two separate forwards."""
    from _helpers import random_family
    from models.diffusion import edm_precond, expand_to
    from models.registry import build_family
    from models.teacher import inference_only

    model = {**NET, "conditioning": "class", "num_classes": 3}
    with inference_only():
        fam = build_family("consistency", {**model, "teacher_guidance": 3.0, "levels": 6})
    teacher = random_family("edm", NET, seed=1, conditioning="class", num_classes=3)
    object.__setattr__(fam, "_teacher", teacher)
    rows: list[int] = []
    teacher.net.register_forward_pre_hook(lambda m, args: rows.append(int(args[0].shape[0])))
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0])
    fam.train()
    fam.loss({"image": torch.rand((4, 3, 16, 16), generator=g) * 2 - 1, "label": labels}, g)
    assert rows == [8, 8]  # 2 Heun denoiser calls, one forward each: 4 conditional + 4 unconditional images
    t = TrainConfig(family="edm", model=model, steps=10, batch_size=4, label_keywords=("a", "b", "c"))
    assert distill_cost(DistillRequest(teacher="t", method="consistency", steps=1, teacher_guidance=3.0), t,
                        [{}])["teacher_calls"] == sum(rows)
    cond, uncond = fam.condition_from(labels, 4, "test"), fam.null_condition(4)
    x = torch.randn((4, 3, 16, 16), generator=g)
    sigma = torch.tensor([0.5, 2.0, 10.0, 40.0])
    with torch.no_grad():
        got = fam._teacher_denoiser(cond)(x, sigma)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, fam.cfg.sigma_data)
        x_in, n = expand_to(c_in, x) * x, c_noise.to(x.dtype)
        f_u, f_c = teacher.net(x_in, n, uncond), teacher.net(x_in, n, cond)
        want = expand_to(c_skip, x) * x + expand_to(c_out, x) * (f_u + 3.0 * (f_c - f_u))
    assert (f_c - f_u).abs().max() > 1e-3  # the branches differ: guidance acts
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
