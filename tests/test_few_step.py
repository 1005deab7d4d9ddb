"""Few-step families without the distill flow: consistency *training* (iCT, no teacher) and DMD
(distribution matching with an online fake score and the regression loss on teacher pairs).
Mechanisms: the iCT curriculum and lognormal pair sampling are the paper's formulas and resume
exactly; f(x, sigma_min) = x; DMD's distribution-matching gradient vanishes while the fake score
equals the real one, both of its optimizers train, the teacher stays out of the checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from _helpers import TINY_UNET, register_world_dataset, world_scene_shards
from imagegen.distill import reflow_pairs
from imagegen.train.checkpoint import read_checkpoint
from imagegen.train.runs import TrainRequest, get_run, prepare, train_run
from imagegen.train.trainer import TrainConfig, train
from models.ict import discretisation, pair_probabilities
from models.registry import build_family, get_family
from models.checkpoint import load_family
from models.teacher import TeacherError

pytestmark = pytest.mark.slow  # 24 s on the shared 2 cores: outside the fast tier (README, "Tests")

COMMON = dict(batch_size=8, lr=1e-3, warmup_steps=1, epoch_batches=4, shuffle_buffer=16, sample_count=2, seed=3)


def losses(run: Path, col: str = "loss/model") -> list[float]:
    return pd.read_parquet(run / "metrics.parquet")[col].tolist()


# ----------------------------------------------------------------------------- iCT


def test_ict_curriculum_and_pair_sampling_are_the_papers():
    # K' = floor(100 / (log2(128) + 1)) = 12: N doubles every 12 steps from 11 to 1281
    assert [discretisation(k, 100, 10, 1280) for k in (0, 11, 12, 24, 36, 84, 99, 500)] == \
        [11, 11, 21, 41, 81, 1281, 1281, 1281]
    fam = build_family("ict", {**TINY_UNET})
    sig = fam.sigmas(11)
    assert float(sig[0]) == pytest.approx(0.002) and float(sig[-1]) == pytest.approx(80.0) and (sig.diff() > 0).all()
    p = pair_probabilities(sig, -1.1, 2.0)
    phi = lambda s: 0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2))))  # noqa: E731
    raw = torch.tensor([phi(float(b)) - phi(float(a)) for a, b in zip(sig[:-1], sig[1:])], dtype=torch.float64)
    torch.testing.assert_close(p, raw / raw.sum())
    # f(x, sigma_min) = x: the boundary condition holds for any network
    x = torch.randn(2, 3, 16, 16)
    out = fam.consistency(lambda xi, n: torch.randn_like(xi) * 10, x, torch.full((2,), 0.002))
    torch.testing.assert_close(out, x)


def test_ict_trains_through_the_trainer_resumes_exactly_and_samples(tmp_path):
    shards = world_scene_shards(tmp_path / "shards", n=32, per_shard=16)
    c = dict(family="ict", model={**TINY_UNET, "curriculum_steps": 6, "s0": 2, "s1": 8}, steps=6, ckpt_every=2,
             sample_steps=2, **COMMON)
    train(c, shards, tmp_path / "full")
    train(c, shards, tmp_path / "part", stop_after=3)
    train(c, shards, tmp_path / "part")
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    # K' = floor(6 / (log2(4) + 1)) = 2: N = 3, 3, 5, 5, 9, 9 over the six steps (the curriculum resumed too)
    assert losses(tmp_path / "part", "log/levels") == [3, 3, 5, 5, 9, 9]
    fam = load_family(sorted((tmp_path / "full" / "checkpoints").iterdir())[-1])
    assert int(fam.steps_done) == 6
    for steps in (1, 2):
        res = fam.sample_result(3, steps=steps, generator=torch.Generator().manual_seed(0))
        assert res.sample.shape == (3, 3, 16, 16) and res.nfe == steps


# ----------------------------------------------------------------------------- DMD


@pytest.fixture(scope="module")
def dmd_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmd-root")
    register_world_dataset(root, n=32, per_shard=16)
    teacher = train_run({"dataset": "world-tiny", "train": dict(
        family="flow", model={**TINY_UNET, "t_sampling": "uniform"}, steps=6, ckpt_every=6, sample_steps=2,
        **COMMON)}, root)
    tcfg = TrainConfig(**get_run(root, teacher["run_id"]).card["config"])
    pairs = reflow_pairs(root, teacher["run_id"], tcfg, n=16, steps=2, sampler="euler", guidance=1.0, seed=0)
    return root, teacher, pairs


def dmd_request(setup, **model) -> TrainRequest:
    root, teacher, pairs = setup
    return TrainRequest(dataset=pairs, train=dict(
        family="dmd", model={**TINY_UNET, "teacher": f"run:{teacher['run_id']}", **model}, steps=5, ckpt_every=2,
        sample_steps=1, **COMMON))


def test_dm_gradient_vanishes_while_the_fake_score_is_the_real_one(dmd_setup):
    root, teacher, _ = dmd_setup
    fam = build_family("dmd", {**TINY_UNET, "teacher": str(teacher["checkpoint"])})
    assert not any(k.startswith("_teacher") or k.startswith("teacher") for k in fam.state_dict())
    teacher_ids = {id(p) for p in fam.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in fam.parameters()}
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    batch = {"image": x, "meta": [{"noise_seed": i} for i in range(4)]}
    out = fam.loss(batch, torch.Generator().manual_seed(0))
    assert out.logs["dm"] == 0.0 and out.logs["dm_grad_norm"] == 0.0  # fake == real (both the teacher) at start
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fam.fake_net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = fam.loss(batch, torch.Generator().manual_seed(0))
    assert out.logs["dm_grad_norm"] > 0
    fam.zero_grad(set_to_none=True)
    out.losses["generator"].backward(inputs=list(fam.net.parameters()))
    assert all(p.grad is None for p in fam.fake_net.parameters())
    assert all(p.grad is None for p in fam.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fam.net.parameters())
    # the one-step generator starts as the teacher's one Euler step
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fam.sample(2, x_T=z), load_family(teacher["checkpoint"]).sample(2, steps=1, x_T=z))


def test_dmd_trains_both_optimizers_resumes_exactly_and_samples_in_one_step(dmd_setup, tmp_path):
    root = dmd_setup[0]
    prep = prepare(dmd_request(dmd_setup), root)
    train(prep.resolved, prep.dataset.shards, tmp_path / "full")
    train(prep.resolved, prep.dataset.shards, tmp_path / "part", stop_after=3)
    train(prep.resolved, prep.dataset.shards, tmp_path / "part")
    for col in ("loss/generator", "loss/fake_score"):
        assert losses(tmp_path / "full", col) == losses(tmp_path / "part", col)
    m = pd.read_parquet(tmp_path / "full" / "metrics.parquet")
    assert (m["grad_norm/generator"] > 0).all() and (m["grad_norm/fake_score"] > 0).all()
    assert m["log/dm_grad_norm"].iloc[-1] > 0  # the fake score has moved away from the teacher
    ckpt = sorted((tmp_path / "full" / "checkpoints").iterdir())[-1]
    tensors, _ = read_checkpoint(ckpt)
    assert any(k.startswith("model/fake_net.") for k in tensors) and not any("teacher" in k for k in tensors)
    fam = load_family(ckpt)
    res = fam.sample_result(3, generator=torch.Generator().manual_seed(0))
    assert res.sample.shape == (3, 3, 16, 16) and res.nfe == 1
    with pytest.raises(ValueError, match="exactly one step"):
        fam.sample(2, steps=2)


def test_bad_few_step_configs_are_refused(dmd_setup):
    with pytest.raises(ValidationError, match="s1=5 must be >= s0=10"):
        get_family("ict").Config(s1=5)
    with pytest.raises(ValidationError, match="t_min 0.5 must be < t_max 0.4"):
        get_family("dmd").Config(t_min=0.5, t_max=0.4)
    with pytest.raises(TeacherError, match="no integer 'noise_seed' in their .json; this is not a reflow pairs"):
        prep = prepare(TrainRequest(dataset="world-tiny", train=dmd_request(dmd_setup).train), dmd_setup[0])
        train(prep.resolved, prep.dataset.shards, dmd_setup[0] / "bad-dmd")


def test_reflow_pairs_and_the_nfe_report_run_on_a_pinned_thread_count(dmd_setup, tmp_path):
    """Issue 12: the teacher samples of the reflow pairs and of the NFE report are CPU float
    reductions, so they run on a pinned torch thread count (default 1, never the machine's) that
    is hashed into the pairs' id (and the report's, imagegen.distill.distill); the count in force
    before is restored."""
    from imagegen.determinism import DEFAULT_THREADS
    from imagegen.distill import DistillRequest, nfe_report

    root, teacher, pairs = dmd_setup
    tcfg = TrainConfig(**get_run(root, teacher["run_id"]).card["config"])
    assert DistillRequest(teacher="t", method="reflow").threads == DEFAULT_THREADS == 1
    kw = dict(n=16, steps=2, sampler="euler", guidance=1.0, seed=0)
    assert reflow_pairs(root, teacher["run_id"], tcfg, threads=1, **kw) == pairs  # the default, reused
    before = torch.get_num_threads()
    seen: list[int] = []
    two = reflow_pairs(root, teacher["run_id"], tcfg, threads=2, progress=lambda i, n: seen.append(torch.get_num_threads()),
                       **kw)
    assert two != pairs and seen and set(seen) == {2}
    assert torch.get_num_threads() == before
    fam = load_family(teacher["checkpoint"])
    counts: list[int] = []
    orig = fam.sample_result

    def sample_result(*a, **k):  # the real sampler, recording the thread count it ran on
        counts.append(torch.get_num_threads())
        return orig(*a, **k)

    fam.sample_result = sample_result
    nfe_report([("teacher", fam, 1.0)], tmp_path / "report", tcfg, (1,), 2, 0, teacher_steps=2, threads=3)
    assert counts and set(counts) == {3} and torch.get_num_threads() == before
