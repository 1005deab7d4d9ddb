"""Run the trainer on N processes with ``torchrun`` and keep the whole process tree on a leash.

``launch(cfg, shards, run_dir, nproc)`` writes ``<run>/launch/spec.json`` and starts

    python -m torch.distributed.run --nnodes 1 --nproc-per-node N --rdzv-backend c10d
        --rdzv-endpoint 127.0.0.1:0 -m imagegen.train.worker <spec.json>

in a new session (its own process group), logging to ``<run>/launch/torchrun.log``.  The whole
group (agent and ranks) is killed when the launch times out, when the caller is interrupted or
cancelled (any exception reaching ``launch``, e.g. KeyboardInterrupt or a flow cancellation),
and, if the launching process itself dies without cleaning up (SIGKILL), by a watchdog thread in
every rank that notices the launcher is gone.  Rank 0 writes ``summary.json``; progress comes
from the run's ``progress.json``, polled here and handed to ``progress(info)``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imagegen.artifacts import write_json_atomic

LAUNCHER_PID_ENV = "IMAGEGEN_LAUNCHER_PID"


class LaunchError(RuntimeError):
    """The distributed run failed, timed out or was interrupted (the message carries the log tail)."""


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (a session leader), SIGKILL what is left after ``grace_s``."""
    if proc.poll() is not None:
        try:  # the leader is gone but ranks may linger in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def torchrun_command(nproc: int, spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "0",
            "-m", "imagegen.train.worker", str(spec_path)]


def launch(cfg: Any, shards: Sequence[str | Path], run_dir: str | Path, nproc: int, *,
           timeout_s: float | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
           stop_after: int | None = None, poll_s: float = 0.5, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train ``cfg`` (a TrainConfig) on ``nproc`` local processes; returns rank 0's summary."""
    from imagegen.train.trainer import TrainConfig

    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig(**cfg)
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if cfg.micro_batches % nproc:
        raise ValueError(f"nproc={nproc} must divide micro_batches={cfg.micro_batches}: every process computes "
                         f"the same number of micro-batch slots (set micro_batches to a multiple of {nproc})")
    if cfg.device == "cuda" or cfg.device == "auto":
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
            raise ValueError(f"nproc={nproc} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    run_dir = Path(run_dir)
    work = run_dir / "launch"
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "summary.json"
    summary_path.unlink(missing_ok=True)
    spec_path = work / "spec.json"
    write_json_atomic(spec_path, {"config": cfg.model_dump(mode="json"), "shards": [str(s) for s in shards],
                                  "run_dir": str(run_dir), "summary": str(summary_path), "stop_after": stop_after})
    log_path = work / "torchrun.log"
    child_env = {**os.environ, **(env or {}), LAUNCHER_PID_ENV: str(os.getpid()),
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH", "")) if p)
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n==== launch {time.strftime('%Y-%m-%dT%H:%M:%S')} nproc={nproc}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(torchrun_command(nproc, spec_path), stdout=log_file, stderr=subprocess.STDOUT,
                                env=child_env, start_new_session=True, cwd=root)
    (work / "torchrun.pid").write_text(f"{proc.pid}\n")  # = its process group id (session leader)
    t0 = time.monotonic()
    seen: float | None = None
    prog = run_dir / "progress.json"
    try:
        while proc.poll() is None:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                kill_group(proc)
                raise LaunchError(f"distributed training timed out after {timeout_s:.0f} s; killed the torchrun "
                                  f"process group. Log {log_path}:\n{_log_tail(log_path)}")
            if progress is not None and prog.is_file():
                mtime = prog.stat().st_mtime
                if mtime != seen:
                    seen = mtime
                    try:
                        progress(json.loads(prog.read_text()))
                    except ValueError:
                        pass  # replaced while reading: next poll
            time.sleep(poll_s)
    except BaseException:
        kill_group(proc)
        raise
    kill_group(proc)  # ranks that outlived the agent, if any
    if proc.returncode != 0 or not summary_path.is_file():
        raise LaunchError(f"distributed training failed (torchrun exit code {proc.returncode}). "
                          f"Log {log_path}:\n{_log_tail(log_path)}")
    return json.loads(summary_path.read_text())
