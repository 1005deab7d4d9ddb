"""Fault injection with real processes: same request, same bytes, however the run went.

Each test runs ``imagegen`` as a subprocess in its own process group (``imagegen.faultinject``),
kills the whole group with SIGKILL where the test says and reruns; the reference is an
uninterrupted run of the same request in another data root.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from imagegen import faultinject as F

REPO = F.REPO
IMAGEGEN = F.IMAGEGEN


def _ok(o: F.Outcome) -> dict:
    assert o.returncode == 0, f"exit {o.returncode}\n{o.stderr[-4000:]}"
    assert o.result is not None
    return o.result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny curate: the bytes every other run must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    out = _ok(F.run(F.curate_cmd(root), env={"OMP_NUM_THREADS": "1"}))
    return root, out, F.dataset_digests(out["path"])


@pytest.mark.slow
def test_two_clean_runs_in_separate_roots_give_identical_shards(reference, tmp_path):
    """Finding 1 and 2: another data root (so another server port) and another default thread
    count (OMP_NUM_THREADS=2 plus a busy core) give the same dataset id and the same bytes."""
    root, out, digests = reference
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        again = _ok(F.run(F.curate_cmd(tmp_path), env={"OMP_NUM_THREADS": "2"}))
    finally:
        burner.kill()
        burner.wait()
    assert again["path"] != out["path"] and again["dataset_id"] == out["dataset_id"]
    assert F.dataset_digests(again["path"]) == digests


@pytest.mark.slow
def test_curate_killed_in_every_stage_resumes_to_the_same_bytes(reference, tmp_path):
    """kill -9 of curate's process group in each stage in turn (a random moment after the stage
    before it finished), then one last run: same dataset bytes as the undisturbed run, nothing
    left over, and every stage that had finished is reused, not recomputed."""
    _, out, digests = reference
    rng = random.Random(12)
    finished: set[str] = set()
    for before, stage in zip(F.CURATE_STAGES, F.CURATE_STAGES[1:]):
        o = F.run(F.curate_cmd(tmp_path), kill_after_line=f"[{before}]",
                  delay=F.random_delay(rng, 2.0 if stage in ("reference_clip", "download") else 0.3))
        status = F.stage_status(o)
        assert all(status.get(s) == "cached" for s in finished if s in status), (stage, status)
        finished |= set(status)
        if not o.killed:  # the stage finished before the kill landed: the drill moves on
            assert o.returncode == 0, o.stderr[-3000:]
    last = F.run(F.curate_cmd(tmp_path))
    res = _ok(last)
    status = F.stage_status(last)
    assert all(status[s] == "cached" for s in finished if s in status), status
    assert res["dataset_id"] == out["dataset_id"]
    assert F.dataset_digests(res["path"]) == digests
    assert F.leftovers(tmp_path) == []


@pytest.mark.slow
def test_two_concurrent_runs_of_one_request_on_one_root(reference, tmp_path):
    """Both succeed with the same id and identical bytes; a reader that sees the dataset folder
    once never sees it missing afterwards (the second writer never replaces it)."""
    _, out, digests = reference
    final = tmp_path / "datasets" / out["dataset_id"]
    seen, vanished, stop = [], [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            here = (final / "card.json").is_file()
            if seen and not here:
                vanished.append(time.time())
            if here and not seen:
                seen.append(os.stat(final).st_ino)
            time.sleep(0.02)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    results: list[F.Outcome] = []
    runners = [threading.Thread(target=lambda: results.append(F.run(F.curate_cmd(tmp_path)))) for _ in range(2)]
    for r in runners:
        r.start()
    for r in runners:
        r.join()
    stop.set()
    t.join()
    a, b = (_ok(o) for o in results)
    assert a["dataset_id"] == b["dataset_id"] == out["dataset_id"] and a["path"] == b["path"]
    assert seen and not vanished and os.stat(final).st_ino == seen[0]
    assert F.dataset_digests(a["path"]) == digests
    assert F.leftovers(tmp_path) == []


@pytest.mark.slow
def test_train_killed_at_a_random_step_resumes_bit_identically(reference, tmp_path):
    """kill -9 of ``imagegen train`` after a random logged step, rerun: the final checkpoint's
    tensors (model, EMA, optimizer, RNG) equal an uninterrupted run's, bit for bit."""
    root, out, _ = reference
    straight = _ok(F.run(F.train_cmd(root, out["dataset_id"], "train.seed=1")))
    other = tmp_path / "root"
    _ok(F.run(F.curate_cmd(other)))
    rng = random.Random(3)
    k = rng.randint(5, 18)
    o = F.run(F.train_cmd(other, out["dataset_id"], "train.seed=1"), kill_after_line=f"[train] step {k}/")
    assert o.killed or o.returncode == 0
    resumed = _ok(F.run(F.train_cmd(other, out["dataset_id"], "train.seed=1")))
    assert resumed["run_id"] == straight["run_id"]
    assert F.checkpoint_tensors(resumed["run_dir"]) == F.checkpoint_tensors(straight["run_dir"])
    assert F.leftovers(other / "runs") == []


@pytest.mark.parametrize("args, says", [
    (["train", "--preset", "smoke", "--set", "train.family=os:system"], "not a subclass of models.base.Family"),
    (["curate", "--url-list", "{dup}"], "--set download.on_duplicate_urls=skip"),
    (["curate", "--url-list", "{bad}"], "line 2"),
    (["curate", "--url-list", "{ok}"], "filter.clip_score.model"),
])
def test_bad_input_is_exit_2_with_a_message_and_leaves_no_data_root(tmp_path, args, says):
    """Finding 7 and 10: refusals are exit 2 and one message, never a traceback, and a refused
    request leaves no data root behind."""
    lists = {"dup": '{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}\n' * 2,
             "bad": '{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}\n{"url": "http://x", caption\n',
             "ok": '{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}\n'}
    for name, text in lists.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    args = [a.format(**{n: tmp_path / f"{n}.jsonl" for n in lists}) for a in args]
    root = tmp_path / "root"
    p = subprocess.run([*IMAGEGEN, *args, "--data-root", str(root), "--no-prefect"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    assert says in p.stderr, p.stderr[-2000:]
    assert not root.exists()


def test_every_problem_of_a_training_request_is_named_in_one_refusal(tmp_path):
    """Finding 10: a kl_autoencoder request with independent mistakes (a family field out of
    range, two cross-field problems of the family config, a trainer field out of range, a
    trainer cross-field problem) is refused once, exit 2, naming every one of them."""
    sets = ["train.family=kl_autoencoder", "train.model.width=2", "train.model.image_size=30",
            "train.model.conditioning=text", "train.lr=-1", "train.warmup_steps=500", "train.steps=10"]
    root = tmp_path / "root"
    p = subprocess.run([*IMAGEGEN, "train", "--preset", "smoke", *[a for s in sets for a in ("--set", s)],
                        "--data-root", str(root), "--no-prefect"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout
    for says in ("train.model.width", "image_size 30 is not divisible by 2^levels",
                 "the VAE is unconditional", "train.lr", "warmup_steps=500 exceeds steps=10"):
        assert says in p.stderr, (says, p.stderr[-3000:])
    assert not root.exists()
