"""Generic trainer: learning, exact kill-and-resume, EMA, NaN guard, checkpoint refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from _helpers import gradient_shards

from imagegen.train import EMA, CheckpointError, TrainConfig, TrainingDiverged, sample_images, train
from imagegen.train.checkpoint import TENSORS, list_checkpoints, load_checkpoint, read_checkpoint
from models.base import LossOut
from models.checkpoint import load_family
from models.ddpm import DDPM
from models.registry import build_family, register_family

MODEL = {"net": "unet", "net_size": "tiny", "image_size": 16, "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}


def base_cfg(**kw: Any) -> dict[str, Any]:
    cfg = dict(family="ddpm", model=MODEL, steps=20, batch_size=8, lr=2e-3, warmup_steps=3, schedule="cosine",
               grad_clip=1.0, seed=3, ckpt_every=5, epoch_batches=3, shuffle_buffer=16)
    cfg.update(kw)
    return cfg


class NanDDPM(DDPM):
    """DDPM whose loss is NaN on the listed calls (0-based), to exercise the guard."""

    name: ClassVar[str] = "test_nan_ddpm"
    nan_calls: ClassVar[set[int]] = set()

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> LossOut:
        calls = getattr(self, "_calls", 0)
        self._calls = calls + 1
        out = super().loss(batch, generator)
        if calls in self.nan_calls:
            out.losses["model"] = out.losses["model"] * float("nan")
        return out


register_family(NanDDPM)


class PartFrozenDDPM(DDPM):
    """DDPM with a frozen input conv and a persistent buffer (like a frozen base or target net)."""

    name: ClassVar[str] = "test_part_frozen_ddpm"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.net.conv_in.requires_grad_(False)
        self.register_buffer("seen", torch.zeros(()))


register_family(PartFrozenDDPM)




@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return gradient_shards(tmp_path_factory.mktemp("trainer-shards"))


def losses(run_dir: Path) -> list[float]:
    return pd.read_parquet(run_dir / "metrics.parquet")["loss/model"].tolist()


@pytest.mark.slow
def test_tiny_ddpm_loss_falls(shards, tmp_path):
    res = train(base_cfg(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, ckpt_every=40, epoch_batches=10),
                shards, tmp_path)
    assert res["finished"] and res["step"] == 40 and res["bad_steps"] == 0
    df = pd.read_parquet(tmp_path / "metrics.parquet")
    assert df["step"].tolist() == list(range(1, 41))
    assert not df["skipped"].any() and np.isfinite(df["grad_norm/model"]).all()
    first, last = df["loss/model"][:8].mean(), df["loss/model"][-8:].mean()
    assert last < 0.6 * first, (first, last)
    # warmup then cosine: lr rises to the peak at step 5, then decays
    lr = df["lr/model"].tolist()
    assert lr[0] == pytest.approx(3e-3 / 5) and lr[4] == pytest.approx(3e-3) and lr[-1] < 1e-4
    print(f"\ntiny ddpm: {res['steps_per_s']:.1f} steps/s, loss {first:.3f} -> {last:.3f}")


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_trajectory_exactly(shards, tmp_path):
    straight = tmp_path / "straight"
    train(base_cfg(ema_decay=0.9), shards, straight)
    resumed = tmp_path / "resumed"
    res = train(base_cfg(ema_decay=0.9), shards, resumed, stop_after=12)  # "killed" at 12, last checkpoint 10
    assert res["step"] == 12 and not res["finished"]
    assert [p.name for p in list_checkpoints(resumed)][-1] == "step_00000010"
    res = train(base_cfg(ema_decay=0.9), shards, resumed)
    assert res["start_step"] == 10 and res["step"] == 20
    a, b = losses(straight), losses(resumed)
    assert len(a) == len(b) == 20
    assert a == b  # bit for bit, every step (steps 11-12 were rerun and their old rows replaced)
    ta, _ = read_checkpoint(list_checkpoints(straight)[-1])
    tb, _ = read_checkpoint(list_checkpoints(resumed)[-1])
    for k in ta:
        if k.startswith(("model/", "ema/", "optim/")):
            assert torch.equal(ta[k], tb[k]), k
    # keep_checkpoints=3: steps 10, 15, 20
    assert [p.name for p in list_checkpoints(resumed)] == ["step_00000010", "step_00000015", "step_00000020"]
    # a finished run called again does nothing
    assert train(base_cfg(ema_decay=0.9), shards, resumed)["start_step"] == 20


def test_ema_is_saved_differs_and_sampling_uses_it(shards, tmp_path):
    cfg = base_cfg(steps=6, ema_decay=0.8, ckpt_every=6, sample_every=6, sample_count=2, sample_steps=4)
    res = train(cfg, shards, tmp_path)
    tensors, meta = read_checkpoint(Path(res["checkpoint"]))
    assert meta["has_ema"]
    raw = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
    assert set(ema) <= set(raw) and any(not torch.equal(ema[k], raw[k]) for k in ema)

    fam = build_family("ddpm", MODEL)
    fam.load_state_dict(raw)
    shadow = EMA(fam, 0.8)
    shadow.load_state_dict(ema)
    live_before = {k: v.clone() for k, v in fam.state_dict().items()}
    with_ema = sample_images(fam, shadow, 2, seed=cfg["seed"] + 6, steps=4)
    assert all(torch.equal(v, live_before[k]) for k, v in fam.state_dict().items())  # live weights restored
    with_raw = sample_images(fam, None, 2, seed=cfg["seed"] + 6, steps=4)
    assert not torch.equal(with_ema, with_raw)
    # the grid the trainer wrote is the EMA sample
    grid = np.array(Image.open(res["samples"][0]))
    expect = ((with_ema.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert np.array_equal(grid, torch.cat(list(expect), dim=2).permute(1, 2, 0).numpy())


def test_swap_in_restores_live_weights_on_error():
    fam = build_family("ddpm", MODEL)
    ema = EMA(fam, 0.5)
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(1.0)
    ema.update(fam)
    live = {k: v.clone() for k, v in fam.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap_in(fam):
            assert any(not torch.equal(v, live[k]) for k, v in fam.state_dict().items())
            raise RuntimeError("boom")
    assert all(torch.equal(v, live[k]) for k, v in fam.state_dict().items())
    with pytest.raises(ValueError, match="decay"):
        EMA(fam, 1.0)


@pytest.mark.slow
def test_nan_steps_are_skipped_then_abort(shards, tmp_path):
    NanDDPM.nan_calls = {2, 4}
    res = train(base_cfg(family="test_nan_ddpm", steps=8, max_bad_steps=2), shards, tmp_path / "ok")
    assert res["finished"] and res["bad_steps"] == 2
    df = pd.read_parquet(tmp_path / "ok" / "metrics.parquet")
    assert df.loc[df["skipped"], "step"].tolist() == [3, 5]
    assert df.loc[~df["skipped"], "loss/model"].notna().all()

    NanDDPM.nan_calls = {1, 2, 3}
    with pytest.raises(TrainingDiverged, match=r"3 steps with a non-finite .*max_bad_steps=2"):
        train(base_cfg(family="test_nan_ddpm", steps=8, max_bad_steps=2), shards, tmp_path / "bad")
    NanDDPM.nan_calls = set()


@pytest.mark.slow
def test_corrupt_or_mismatched_checkpoint_is_refused_before_training(shards, tmp_path):
    run = tmp_path / "run"
    train(base_cfg(steps=5), shards, run)
    ckpt = list_checkpoints(run)[-1]
    metrics_before = (run / "metrics.parquet").read_bytes()

    with pytest.raises(CheckpointError, match="different config.*lr"):
        train(base_cfg(steps=10, lr=1e-3), shards, run)
    with pytest.raises(CheckpointError, match="different config.*model"):
        train(base_cfg(steps=10, model={**MODEL, "net_overrides": {"model_channels": 32, "norm_groups": 8, "head_channels": 16}}), shards, run)
    with pytest.raises(CheckpointError, match="family 'ddpm'.*'test_nan_ddpm'"):
        train(base_cfg(family="test_nan_ddpm", steps=10), shards, run)
    assert (run / "metrics.parquet").read_bytes() == metrics_before  # nothing trained

    # the same config but a net of another shape (e.g. the net code changed): refused by shape, untouched
    wide = build_family("ddpm", {**MODEL, "net_overrides": {"model_channels": 32, "norm_groups": 8,
                                                             "head_channels": 16}})
    fresh = {k: v.clone() for k, v in wide.state_dict().items()}
    cfg_json = TrainConfig(**base_cfg(steps=5)).model_dump(mode="json")
    opt = {"model": torch.optim.AdamW(wide.parameters())}
    with pytest.raises(CheckpointError, match="model weights does not match.*shape mismatches"):
        load_checkpoint(ckpt, family=wide, optimizers=opt, schedulers={}, ema=None, config=cfg_json,
                        generators={})
    assert all(torch.equal(v, fresh[k]) for k, v in wide.state_dict().items())

    meta = json.loads((ckpt / "state.json").read_text())
    data = bytearray((ckpt / TENSORS).read_bytes())
    data[-5] ^= 0xFF
    (ckpt / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*sha256"):
        train(base_cfg(steps=10), shards, run)
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        train(base_cfg(steps=10), shards, run)
    assert meta["step"] == 5


def test_damaged_newest_checkpoint_falls_back_to_the_newest_valid_one(shards, tmp_path, caplog):
    """Finding 6: a corrupt step_*/tensors.safetensors is skipped with a warning naming it; the
    run resumes from the step before and ends bit-identical to an undisturbed run."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(base_cfg(steps=15), shards, straight)
    train(base_cfg(steps=15), shards, run, stop_after=10)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_00000010"
    data = bytearray((newest / TENSORS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / TENSORS).write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        res = train(base_cfg(steps=15), shards, run)
    assert res["start_step"] == 5 and res["step"] == 15
    assert any("step_00000010" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    ta, _ = read_checkpoint(list_checkpoints(straight)[-1])
    tb, _ = read_checkpoint(list_checkpoints(run)[-1])
    assert all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith(("model/", "ema/", "optim/")))
    assert losses(straight) == losses(run)
    # the damaged folder was re-made by the resumed run (same step), nothing damaged is left under a step name
    assert [p.name for p in list_checkpoints(run)] == ["step_00000005", "step_00000010", "step_00000015"]


def test_bad_config_is_refused():
    with pytest.raises(ValidationError, match="unknown model family 'nope'"):
        TrainConfig(**base_cfg(family="nope"))
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(**base_cfg(learning_rate=1.0))
    with pytest.raises(ValidationError, match="betas"):
        TrainConfig(**base_cfg(betas=(0.9, 1.0)))
    with pytest.raises(ValidationError, match="warmup_steps=30 exceeds steps=20"):
        TrainConfig(**base_cfg(warmup_steps=30))
    with pytest.raises(ValidationError, match="net_size"):
        TrainConfig(**base_cfg(model={**MODEL, "net_size": "huge"}))


def test_ema_update_is_the_decay_formula():
    fam = build_family("ddpm", MODEL)
    ema = EMA(fam, 0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(1.0)
    ema.update(fam)
    live = fam.state_dict()
    trainable = {n for n, p in fam.named_parameters()}
    assert set(ema.state_dict()) == trainable
    for k, s in ema.state_dict().items():
        torch.testing.assert_close(s, 0.9 * start[k] + 0.1 * live[k], rtol=1e-6, atol=1e-6, msg=k)


def test_ema_warmup_forgets_the_init():
    """With warm-up the decay after step n is min(decay, (1+n)/(10+n)): the first update keeps only
    1/10 of the init, and after 200 steps of decay 0.99 the init's share is far below 0.99^200."""
    fam = build_family("ddpm", MODEL)
    ema = EMA(fam, 0.99, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.99
    assert EMA(fam, 0.99).decay_at(0) == 0.99  # no warm-up: the plain decay
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(1.0)
    ema.update(fam, step=0)
    live = fam.state_dict()
    for k, s in ema.state_dict().items():
        torch.testing.assert_close(s, 0.1 * start[k] + 0.9 * live[k], rtol=1e-6, atol=1e-6, msg=k)
    share_init, share_plain = 1.0, 0.99 ** 200
    for n in range(200):
        share_init *= ema.decay_at(n)
    assert share_init < 1e-3 * share_plain


def test_trainer_ema_warmup_is_in_the_run_id():
    from imagegen.train.runs import run_identity

    a, b = TrainConfig(**base_cfg(ema_decay=0.9)), TrainConfig(**base_cfg(ema_decay=0.9, ema_warmup=False))
    assert a.ema_warmup and not b.ema_warmup
    assert run_identity("d", a) != run_identity("d", b)


def test_ema_shadows_only_trainable_weights(shards, tmp_path):
    """Frozen weights and buffers are stored once (model/), not copied into ema/; loading the EMA
    weights takes them from model/, and tied aliases of a trainable weight follow the EMA."""
    fam = build_family("ddpm", MODEL)
    frozen = [n for n, _ in fam.net.named_parameters()][:4]
    for n, p in fam.net.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    ema = EMA(fam, 0.5)
    assert not {f"net.{n}" for n in frozen} & set(ema.state_dict())
    assert set(ema.state_dict()) == {n for n, p in fam.named_parameters() if p.requires_grad}

    lin = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False))
    lin[1].weight = lin[0].weight  # tied: two state_dict names, one tensor
    tied = EMA(lin, 0.5)
    assert set(tied.state_dict()) == {"0.weight", "1.weight"}
    with torch.no_grad():
        lin[0].weight.add_(2.0)
    tied.update(lin)
    torch.testing.assert_close(tied.state_dict()["0.weight"], tied.state_dict()["1.weight"])

    res = train(base_cfg(family="test_part_frozen_ddpm", steps=4, ema_decay=0.5, ckpt_every=4), shards, tmp_path)
    tensors, meta = read_checkpoint(Path(res["checkpoint"]))
    ema_keys = {k[4:] for k in tensors if k.startswith("ema/")}
    model_keys = {k[6:] for k in tensors if k.startswith("model/")}
    trained = build_family("test_part_frozen_ddpm", MODEL)
    assert ema_keys == {n for n, p in trained.named_parameters() if p.requires_grad}
    assert model_keys - ema_keys == {"seen", "net.conv_in.weight", "net.conv_in.bias"}  # stored once
    loaded = load_family(res["checkpoint"])
    for k, v in loaded.state_dict().items():
        src = f"ema/{k}" if k in ema_keys else f"model/{k}"
        assert torch.equal(v, tensors[src]), k
