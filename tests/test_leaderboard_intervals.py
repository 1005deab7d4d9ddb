"""Leaderboards show each metric's interval, mark main-metric differences within the intervals,
and carry one protocol card; two leaderboards are comparable only when their cards agree."""

from __future__ import annotations

import pytest

from imagegen.evaluate.protocol import eval_protocol, leaderboard_protocol
from imagegen.leaderboard import WITHIN, build_leaderboard, comparable, leaderboard, leaderboard_markdown

ROW = {"metric": "FID", "extractor": "inception", "extractor_weights": '{"sha256": "ab"}', "mode": "clean",
       "reference_stats_sha256": "f" * 64}


def summary(name: str, fid: float, ci: tuple[float, float], n: int = 100, seed: int = 0, weights: str = "ab") -> dict:
    req = {"reference": "ref", "n_resamples": 50, "confidence": 0.95, "guidance": 1.0, "fid_mode": "clean"}
    row = {**ROW, "extractor_weights": f'{{"sha256": "{weights}"}}'}
    return {"eval_id": name, "path": f"/evals/{name}", "metrics": {"FID": fid}, "skipped": {}, "run_id": None,
            "family": None, "sampler": None, "steps": None, "nfe": None, "guidance": 1.0, "n_samples": n,
            "seconds": 0.0, "metrics_file": None, "reused": False, "intervals": {"FID": list(ci)},
            "protocol": eval_protocol([row], req, [seed], n)}


def test_intervals_shown_and_overlaps_marked(tmp_path):
    evals = [summary("c", 30.0, (29.0, 31.0)), summary("a", 10.0, (9.0, 12.0)), summary("b", 11.0, (10.5, 11.5))]
    df = leaderboard(tmp_path, evals)
    assert df["eval_id"].tolist() == ["a", "b", "c"]  # lower FID first
    assert df[WITHIN].tolist() == [None, True, False]  # b's interval overlaps a's; c is clearly worse than b
    assert df.loc[0, "FID ci_low"] == 9.0 and df.loc[2, "FID ci_high"] == 31.0
    md = leaderboard_markdown(df)
    assert "10 [9, 12]" in md and "≈ 11 [10.5, 11.5]" in md and "30 [29, 31]" in md and "≈ 30" not in md


def test_protocol_card_and_comparability(tmp_path):
    a = build_leaderboard(tmp_path, [summary("a", 10.0, (9, 11)), summary("b", 12.0, (11, 13), seed=1)])
    b = build_leaderboard(tmp_path, [summary("c", 10.0, (9, 11), seed=5)])
    card = a["protocol"]
    assert card["n_samples"] == 100 and card["seeds"] == [0, 1] and card["n_seeds"] == 1 and not card["mixed"]
    assert card["metrics"]["FID"]["reference_stats_sha256"] == "f" * 64
    assert card["metrics"]["FID"]["mode"] == "clean" and len(card["metrics"]["FID"]["extractor_weights_sha256"]) >= 16
    assert comparable(a, b) == []  # other seeds, same protocol
    other_n = build_leaderboard(tmp_path, [summary("d", 10.0, (9, 11), n=50)])
    assert any("n_samples differs: 100 vs 50" in w for w in comparable(a, other_n))
    other_weights = build_leaderboard(tmp_path, [summary("e", 10.0, (9, 11), weights="cd")])
    assert any("FID: extractor_weights_sha256 differs" in w for w in comparable(a, other_weights))
    mixed = leaderboard_protocol([summary("a", 1, (0, 2))["protocol"], summary("f", 1, (0, 2), n=7)["protocol"]])
    assert any(m.startswith("n_samples") for m in mixed["mixed"])
    assert "## Protocol" in open(a["files"]["markdown"]).read()
    assert comparable(a, {"leaderboard_id": "old"})[0].endswith("(built before cards existed)")


@pytest.mark.parametrize("bad", ["mixed"])
def test_a_mixed_leaderboard_is_never_comparable(tmp_path, bad):
    a = build_leaderboard(tmp_path, [summary("a", 1, (0, 2)), summary("g", 1, (0, 2), n=7)])
    assert comparable(a, a)[0].startswith("card A mixes protocols")
