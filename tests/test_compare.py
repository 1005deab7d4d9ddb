"""The human A/B page: pairing two evaluation sets by seed and caption, votes with undo and resume, the
Wilson interval against scipy, and a scripted person judging 20 pairs in headless Chromium."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen import compare as CMP

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "compare"


def _eval_set(root: Path, eval_id: str, level: int, n: int = 20, seed: int = 0, captions=None) -> str:
    """An evaluation folder as generate_set writes it: samples/NNNNN.png + captions.jsonl, and a card."""
    folder = root / "evals" / eval_id / "samples"
    folder.mkdir(parents=True)
    rng = np.random.default_rng([level, seed])
    caps = captions or [f"a photo of shape {i % 7}" for i in range(n)]
    for i in range(n):
        arr = np.clip(level + rng.normal(0, 12, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    (folder / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i:05d}.png", "caption": caps[i]}) + "\n"
                                                   for i in range(n)))
    (root / "evals" / eval_id / "card.json").write_text(json.dumps({"run_id": f"run-{eval_id}",
                                                                    "request": {"seed": seed, "n_samples": n}}))
    return eval_id


def test_pairs_need_the_same_seed_and_caption(tmp_path):
    a = _eval_set(tmp_path, "evalA", 200)
    caps = [f"a photo of shape {i % 7}" for i in range(20)]
    caps[3] = "something else"
    b = _eval_set(tmp_path, "evalB", 60, captions=caps)
    pairs, account = CMP.pair_sets(tmp_path, a, b)
    assert len(pairs) == 19 and account["caption_mismatch"] == 1 and 3 not in [p.index for p in pairs]
    _eval_set(tmp_path, "evalC", 60, seed=5)
    with pytest.raises(CMP.CompareError, match="seed 0.*seed 5"):
        CMP.pair_sets(tmp_path, a, "evalC")
    with pytest.raises(CMP.CompareError, match="does not exist"):
        CMP.pair_sets(tmp_path, a, "nope")


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 5), (3, 10), (14, 20), (20, 20), (480, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert CMP.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert CMP.wilson_interval(0, 0) == (0.0, 1.0)


def test_session_votes_undo_resume_and_stale_pages(tmp_path):
    a, b = _eval_set(tmp_path, "evalA", 200, n=6), _eval_set(tmp_path, "evalB", 60, n=6)
    s = CMP.CompareSession(tmp_path, a, b, seed=3)
    assert sorted(s.order) == list(range(6))
    s.vote("left")
    s.vote("skip")
    s.undo()
    s.vote("right", position=1)
    with pytest.raises(CMP.CompareError, match="stale page"):
        s.vote("left", position=0)
    votes = pd.read_parquet(s.votes_path)
    assert votes["position"].tolist() == [0, 1] and votes["choice"].tolist() == ["left", "right"]
    # the winner follows the placement: left is A exactly when a_left
    assert votes["winner"].tolist() == [("a" if s.a_left[0] else "b"), ("b" if s.a_left[1] else "a")]
    again = CMP.CompareSession(tmp_path, a, b, seed=3)  # reopening resumes at the next pair
    assert again.position == 2 and again.id == s.id and again.order == s.order


def _brightness(page, side: str) -> float:
    """What the person sees: the mean pixel value of the image on one side (drawn onto a canvas)."""
    return page.evaluate("""side => { const im = document.getElementById(side);
        const c = document.createElement('canvas'); c.width = im.naturalWidth; c.height = im.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(im, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; let s = 0;
        for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
        return s / (d.length / 4 * 3); }""", side)


def test_a_scripted_person_judges_20_pairs_in_chromium(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (.ci/run installs it: apt-get install -y "
                    "chromium)")
    from playwright.sync_api import sync_playwright

    a, b = _eval_set(tmp_path, "evalA", 200), _eval_set(tmp_path, "evalB", 60)  # A's images are brighter
    served = CMP.serve_compare(tmp_path, a, b, seed=11, voter="scripted")
    assert served.url.startswith("http://127.0.0.1:")
    # the person prefers the brighter image, except at these positions, skips one, and corrects one mistake
    prefer_dark, skip_at, mistake_at = {2, 7, 13}, {5}, 9
    expected: dict[int, str | None] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.set_default_timeout(30_000)
            try:
                page.goto(served.url, wait_until="networkidle")
                for pos in range(20):
                    page.wait_for_function(f"document.body.dataset.position === '{pos}'")
                    page.wait_for_function("['left','right'].every(s => document.getElementById(s).complete && "
                                           "document.getElementById(s).naturalWidth > 0)")
                    if pos == 0:
                        SHOTS.mkdir(parents=True, exist_ok=True)
                        page.screenshot(path=str(SHOTS / "pair.png"), full_page=True)
                    left_bright = _brightness(page, "left") > _brightness(page, "right")
                    bright_side = "left" if left_bright else "right"
                    dark_side = "right" if left_bright else "left"
                    if pos in skip_at:
                        page.keyboard.press("s")
                        expected[pos] = None
                        continue
                    side = dark_side if pos in prefer_dark else bright_side
                    if pos == mistake_at:  # picks the wrong side, undoes it with the key, then picks again
                        page.keyboard.press("1" if side == "right" else "2")
                        page.wait_for_function(f"document.body.dataset.position === '{pos + 1}'")
                        page.keyboard.press("u")
                        page.wait_for_function(f"document.body.dataset.position === '{pos}'")
                    if pos % 4 == 0:  # sometimes the mouse
                        page.click(f"#pick-{side}")
                    else:
                        page.keyboard.press("ArrowLeft" if side == "left" else "ArrowRight")
                    expected[pos] = "b" if pos in prefer_dark else "a"
                page.wait_for_function("document.body.dataset.done === 'true'")
                SHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SHOTS / "done.png"), full_page=True)
                print(f"screenshot: {SHOTS / 'done.png'}", file=sys.stderr)
                shown = page.text_content("#report")
            finally:
                browser.close()
    finally:
        served.stop()
    votes = CMP.read_votes(tmp_path, served.session.id)
    assert votes["position"].tolist() == list(range(20))  # the undone vote is gone
    assert {int(r.position): r.winner for r in votes.itertuples()} == expected
    assert (votes["choice"] == "skip").sum() == 1 and set(votes["voter"]) == {"scripted"}
    rep = CMP.win_rate(votes)
    assert (rep["wins_a"], rep["wins_b"], rep["skips"]) == (16, 3, 1)
    lo, hi = CMP.wilson_interval(16, 19)
    assert rep["interval"] == [lo, hi] and rep["significant"] is True
    assert f"A wins 16, B wins 3, skipped 1" in shown and "Wilson" in shown
    # every pair index appears once, and the same prompt was shown on both sides
    assert sorted(votes["pair_index"]) == list(range(20))
