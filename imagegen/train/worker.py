"""One torchrun rank: ``python -m imagegen.train.worker <spec.json>`` (started by launch.py).

Joins the process group, starts a watchdog that kills this rank's process group when the
launching process disappears (so a SIGKILLed launcher leaves no training behind), trains, and
on rank 0 writes the summary the launcher returns.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from imagegen.artifacts import write_json_atomic
from imagegen.train import distributed
from imagegen.train.launch import LAUNCHER_PID_ENV


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_watchdog(pid: int, every_s: float = 1.0) -> threading.Thread:
    def watch() -> None:
        while _alive(pid):
            time.sleep(every_s)
        print(f"imagegen worker {os.getpid()}: launcher {pid} is gone; killing the process group", file=sys.stderr,
              flush=True)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    t = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    t.start()
    return t


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m imagegen.train.worker <spec.json>", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher:
        start_watchdog(int(launcher))
    from imagegen.train.trainer import TrainConfig, train

    cfg = TrainConfig(**spec["config"])
    env = distributed.init_from_env(cfg.device)
    try:
        summary = train(cfg, spec["shards"], spec["run_dir"], stop_after=spec.get("stop_after"))
        if env.is_main:
            write_json_atomic(Path(spec["summary"]), summary)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
