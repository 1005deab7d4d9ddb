"""``imagegen compare RUN_A RUN_B``: both runs sampled with the same prompts and seeds, the A/B page
served on loopback (voted here over real HTTP), the votes stored, the win rate with its Wilson
interval returned and published as a Prefect artifact through flows/publish.py."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from _helpers import artifact_data, eval_world_root, flow_artifacts, tiny_text_run
from imagegen.cli import main

pytestmark = pytest.mark.slow  # two tiny trainings + a Prefect flow run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_compare_cli_serves_pairs_and_publishes_the_win_rate(tmp_path, prefect_server, capsys, one_torch_thread):
    root = tmp_path / "root"
    eval_world_root(root, n=32, per_shard=16)
    run_a, run_b = tiny_text_run(root, steps=2, seed=0), tiny_text_run(root, steps=2, seed=1)
    port = _free_port()
    code: list[int] = []
    t = threading.Thread(target=lambda: code.append(main(
        ["compare", run_a, run_b, "--n", "6", "--steps", "2", "--port", str(port), "--data-root", str(root),
         "--json"])))
    t.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    state = None
    while time.time() < deadline and state is None:
        try:
            with urllib.request.urlopen(base + "/api/state", timeout=5) as r:
                state = json.loads(r.read())
        except OSError:
            time.sleep(0.5)
    assert state is not None, "the page never came up"
    for k in range(6):  # the person prefers the left image, skips the fourth pair
        _post(base + "/api/vote", {"choice": "skip" if k == 3 else "left", "position": k})
    t.join(timeout=300)
    assert code == [0]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    votes = pd.read_parquet(summary["votes_file"])
    decided = votes[votes["choice"] == "left"]
    assert (decided["winner"] == decided["left"]).all()  # the left image won each decided pair
    picked_a = int((decided["left"] == "a").sum())
    assert summary["decided"] == 5 and summary["skips"] == 1 and summary["wins_a"] == picked_a
    lo, hi = summary["interval"]
    assert lo <= picked_a / 5 <= hi
    assert len(votes) == 6 and votes["caption"].notna().all()
    # both sets came from the same seed: same captions at the same index
    caps = [Path(root / "evals" / e / "samples" / "captions.jsonl").read_text() for e in (summary["eval_a"],
                                                                                            summary["eval_b"])]
    assert caps[0] == caps[1]
    arts = flow_artifacts(key="compare-win-rate")
    assert arts and artifact_data(arts[-1])[0]["wins_a"] == picked_a
