"""torchrun data parallelism on CPU (gloo): same run on 1 or 2 processes, resume across layouts,
and the process group is killed on timeout or when the launcher dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from _helpers import gradient_shards
from imagegen.train.checkpoint import list_checkpoints, read_checkpoint
from imagegen.train.launch import LaunchError, launch
from imagegen.train.trainer import train

pytestmark = pytest.mark.slow  # 138 s on the shared 2 cores: outside the fast tier (README, "Tests")

MODEL = {"net": "unet", "net_size": "tiny", "image_size": 16,
         "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}
ROOT = Path(__file__).resolve().parents[1]


def cfg(**kw: Any) -> dict[str, Any]:
    out = dict(family="ddpm", model=MODEL, steps=6, batch_size=8, micro_batches=2, lr=2e-3, warmup_steps=2,
               schedule="cosine", seed=11, ckpt_every=3, epoch_batches=3, shuffle_buffer=16)
    out.update(kw)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return gradient_shards(tmp_path_factory.mktemp("ddp-shards"))


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory) -> Path:
    """The reference: one process computing both micro-batches of each global batch."""
    run = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    train(cfg(), shards, run)
    return run


def losses(run: Path) -> np.ndarray:
    return pd.read_parquet(run / "metrics.parquet")["loss/model"].to_numpy()


def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(list_checkpoints(run)[-1])
    return {k: v for k, v in tensors.items() if k.startswith("model/")}


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pgid: int, within_s: float) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not group_alive(pgid):
            return True
        time.sleep(0.2)
    return not group_alive(pgid)


def test_two_processes_train_the_same_run_as_one(shards, one_process, tmp_path):
    run = tmp_path / "two"
    summary = launch(cfg(), shards, run, nproc=2, timeout_s=300)
    assert summary["world_size"] == 2 and summary["finished"] and summary["step"] == 6
    ref, got = losses(one_process), losses(run)
    assert len(got) == 6
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got[-1] < got[0]
    w1, w2 = weights(one_process), weights(run)
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    # rank 0 alone wrote the run folder; the launch log has both ranks
    assert (run / "loss_curve.png").is_file() and (run / "progress.json").is_file()
    assert len(list(run.glob("samples/*.png"))) == 1


def test_a_two_process_run_resumes_on_one_process(shards, one_process, tmp_path):
    run = tmp_path / "resume"
    part = launch(cfg(), shards, run, nproc=2, stop_after=5, timeout_s=300)  # killed after step 5, last ckpt at 3
    assert part["step"] == 5 and not part["finished"]
    torch.set_num_threads(1)
    rest = train(cfg(), shards, run)
    assert rest["start_step"] == 3 and rest["finished"]
    np.testing.assert_allclose(losses(run), losses(one_process), rtol=1e-5, atol=1e-6)


def test_nproc_must_divide_the_micro_batches(shards, tmp_path):
    with pytest.raises(ValueError, match="nproc=2 must divide micro_batches=1"):
        launch(cfg(micro_batches=1), shards, tmp_path / "x", nproc=2)
    assert not (tmp_path / "x").exists()


def test_timeout_kills_the_whole_process_group(shards, tmp_path):
    run = tmp_path / "slow"
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="timed out after 6 s"):
        launch(cfg(steps=100_000, ckpt_every=100_000), shards, run, nproc=2, timeout_s=6)
    assert time.monotonic() - t0 < 60
    pgid = int((run / "launch" / "torchrun.pid").read_text())
    assert wait_gone(pgid, 10), "torchrun or a rank survived the timeout"


def test_a_killed_launcher_takes_its_ranks_with_it(shards, tmp_path):
    """SIGKILL leaves the launcher no chance to clean up: the ranks' watchdog must."""
    run = tmp_path / "orphan"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from imagegen.train.launch import launch
        launch({cfg(steps=100_000, ckpt_every=100_000)!r}, {[str(s) for s in shards]!r}, {str(run)!r}, nproc=2)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        end = time.monotonic() + 120
        while not (run / "progress.json").is_file():  # ranks are training
            assert parent.poll() is None, "launcher exited early"
            assert time.monotonic() < end, "training never started"
            time.sleep(0.3)
        pgid = int((run / "launch" / "torchrun.pid").read_text())
        assert group_alive(pgid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(pgid, 20), "ranks kept training after their launcher was killed"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_two_optimizer_user_family_from_its_own_module_trains_the_same_on_two_processes(shards, tmp_path):
    """A GAN (generator + discriminator optimizers) named 'module:Class': DDP cannot wrap it, so
    gradients are all-reduced per optimizer; the ranks import the user's module themselves."""
    gan = cfg(family="user_families:PixelGAN", model={"image_size": 16, "hidden": 32}, steps=4, ckpt_every=4,
              warmup_steps=0)
    torch.set_num_threads(1)
    one = train(gan, shards, tmp_path / "one")
    two = launch(gan, shards, tmp_path / "two", nproc=2, timeout_s=300,
                 env={"PYTHONPATH": str(Path(__file__).resolve().parent)})
    assert one["finished"] and two["finished"] and two["world_size"] == 2
    a = pd.read_parquet(tmp_path / "one" / "metrics.parquet")
    b = pd.read_parquet(tmp_path / "two" / "metrics.parquet")
    for col in ("loss/generator", "loss/discriminator", "log/d_real"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-5, atol=1e-6, err_msg=col)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
