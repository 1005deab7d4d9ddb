"""Distillation end to end on tiny teachers trained on the embedded world: progressive
distillation, reflow and consistency distillation, each against a check that could fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _helpers import register_world_dataset
from imagegen.distill import DistillRequest, distill
from imagegen.train.runs import RunError, train_run
from models.reflow import straightness
from models.samplers import flow_euler, flow_timesteps
from models.checkpoint import load_family

pytestmark = pytest.mark.slow  # 352 s on the shared 2 cores: outside the fast tier (README, "Tests")

NET = {"net": "unet", "net_size": "tiny", "image_size": 16,
       "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("distill-root")
    register_world_dataset(r, n=64, per_shard=16)
    return r


def teacher(root: Path, family: str, steps: int = 300, **model: Any) -> str:
    req = {"dataset": "world-tiny", "train": {
        "family": family, "model": {**NET, **model}, "steps": steps, "batch_size": 16, "lr": 2e-3,
        "warmup_steps": min(20, steps), "schedule": "cosine", "ema_decay": 0.95, "ckpt_every": steps, "log_every": 10,
        "epoch_batches": 4, "shuffle_buffer": 64, "sample_count": 4, "sample_steps": 4, "seed": 2}}
    return train_run(req, root)["run_id"]


def noise(n: int = 8, seed: int = 123) -> torch.Tensor:
    return torch.randn((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def test_progressive_student_beats_the_teacher_at_half_the_steps(root):
    tid = teacher(root, "ddpm", prediction="v", schedule="cosine")
    out = distill({"teacher": tid, "method": "progressive", "start_steps": 8, "target_steps": 4, "steps": 150,
                   "lr": 5e-4, "ema_decay": 0.0, "report_count": 4, "report_nfe": [1, 4]}, root)
    assert [r["steps"] for r in out["rounds"]] == [4]
    t = load_family(get_checkpoint(root, tid))
    s = load_family(out["student_checkpoint"])
    assert s.name == "progressive" and s.default_steps == 4
    x = noise()
    ref = t.sample(8, steps=8, x_T=x)
    student, own = mse(s.sample(8, x_T=x), ref), mse(t.sample(8, steps=4, x_T=x), ref)
    print(f"progressive: MSE to teacher@8: student@4 {student:.4f}, teacher@4 {own:.4f}")
    assert student < own
    assert Path(out["report"]["plot"]).is_file()


def test_reflow_straightens_and_its_one_step_is_closer(root):
    tid = teacher(root, "flow", t_sampling="uniform")
    out = distill({"teacher": tid, "method": "reflow", "pairs": 128, "pair_steps": 16, "pair_sampler": "euler",
                   "steps": 200, "lr": 1e-3, "ema_decay": 0.0, "report_count": 4, "report_nfe": [1, 2]}, root)
    t, s = load_family(get_checkpoint(root, tid)), load_family(out["student_checkpoint"])
    assert s.name == "reflow" and s.default_steps == 1
    x = noise()
    ts = flow_timesteps(16)

    def traj(fam):
        net = fam.guided_net({}, {}, 1.0)
        with torch.no_grad():
            return flow_euler(net, x, ts, return_trajectory=True).trajectory

    straight_s, straight_t = straightness(traj(s), ts), straightness(traj(t), ts)
    ref = t.sample(8, steps=16, x_T=x)
    student, own = mse(s.sample(8, steps=1, x_T=x), ref), mse(t.sample(8, steps=1, x_T=x), ref)
    print(f"reflow: straightness student {straight_s:.4f} teacher {straight_t:.4f}; MSE to teacher@16: "
          f"student@1 {student:.4f} teacher@1 {own:.4f}")
    assert straight_s < straight_t
    assert student < own
    # the pairs are a registered, reusable dataset
    again = distill({"teacher": tid, "method": "reflow", "pairs": 128, "pair_steps": 16, "pair_sampler": "euler",
                     "steps": 200, "lr": 1e-3, "ema_decay": 0.0, "report_count": 4, "report_nfe": [1]}, root)
    assert again["dataset_id"] == out["dataset_id"] and again["rounds"][0]["reused"]


def test_consistency_one_step_is_closer_than_the_teachers(root):
    tid = teacher(root, "edm")
    out = distill({"teacher": tid, "method": "consistency", "levels": 6, "steps": 200, "lr": 5e-4,
                   "ema_decay": 0.0, "target_ema": 0.9, "distance": "l2", "report_count": 4,
                   "report_nfe": [1, 2]}, root)
    t, s = load_family(get_checkpoint(root, tid)), load_family(out["student_checkpoint"])
    x = noise()
    ref = t.sample(8, steps=18, x_T=x)
    one_teacher = t.sample(8, sampler="euler", steps=1, x_T=x)
    student, own = mse(s.sample(8, steps=1, x_T=x), ref), mse(one_teacher, ref)
    print(f"consistency: MSE to teacher@18 Heun: student@1 {student:.4f}, teacher@1 {own:.4f}")
    assert student < own


def get_checkpoint(root: Path, run_id: str) -> Path:
    from imagegen.train.runs import get_run

    return get_run(root, run_id).checkpoint


def test_teachers_that_do_not_fit_are_refused(root):
    tid = teacher(root, "flow", steps=2)
    with pytest.raises(RunError, match="progressive distillation needs a DDPM family run in v-prediction"):
        distill({"teacher": tid, "method": "progressive"}, root)
    with pytest.raises(RunError, match="consistency distillation needs an EDM run"):
        distill({"teacher": tid, "method": "consistency"}, root)
    with pytest.raises(LookupError, match="no training run 'nope-nope'"):
        distill({"teacher": "nope-nope", "method": "reflow"}, root)
    with pytest.raises(ValueError, match="start_steps=48 must be target_steps=4 times a power of two"):
        DistillRequest(teacher=tid, method="progressive", start_steps=48, target_steps=4)
    eps = teacher(root, "ddpm", steps=2, prediction="eps")
    with pytest.raises(RunError, match="needs a v-prediction teacher"):
        distill({"teacher": eps, "method": "progressive"}, root)


def test_students_sample_with_the_guidance_they_learned():
    """Reflow pairs and consistency targets carry the teacher's CFG: those students sample without
    a second CFG (the NFE report and the pipeline's evaluation use this one rule)."""
    def req(**kw):
        return DistillRequest(teacher="t", **kw)

    assert req(method="reflow").guidance(True, 3.0) == (3.0, 1.0)
    assert req(method="reflow", pair_guidance=2.0).guidance(True, 3.0) == (2.0, 1.0)
    assert req(method="consistency", teacher_guidance=4.0).guidance(True, 3.0) == (4.0, 1.0)
    assert req(method="progressive").guidance(True, 3.0) == (3.0, 3.0)
    assert req(method="reflow").guidance(False, 3.0) == (1.0, 1.0)
