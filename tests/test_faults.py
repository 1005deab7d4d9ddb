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
def reference(tiny_curate):
    """One uninterrupted tiny curate (conftest ``tiny_curate``, shared with test_serve_auth.py): the
    bytes every other run must reproduce."""
    return tiny_curate


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
    starts writing its output, within a quarter of its reference duration), then one last run:
    every kill landed mid-stage (exit -SIGKILL, no complete output of that stage), the rerun
    recomputes the killed stage and reuses every stage that had finished, and ends on the same
    dataset bytes as the undisturbed run with nothing left over."""
    root, out, digests = reference
    seconds = F.stage_seconds(root)
    rng = random.Random(12)
    finished: set[str] = set()
    killed_in = None
    for stage in F.CURATE_STAGES[1:]:
        o, at_kill = F.kill_curate_in(tmp_path, stage, F.random_delay(rng, 0.25 * seconds[stage]))
        assert o.sigkilled, (stage, o.returncode, o.stderr[-3000:])
        assert at_kill["complete"] == [], at_kill  # the stage had not finished: the kill was mid-work
        status = F.stage_status(o)
        assert stage not in status, status
        assert all(status.get(s) == "cached" for s in finished), (stage, status)
        if killed_in is not None:  # the stage killed last time is recomputed, from scratch
            assert status.get(killed_in) == "done", (killed_in, status)
        finished |= set(status)
        killed_in = stage
    last = F.run(F.curate_cmd(tmp_path))
    res = _ok(last)
    status = F.stage_status(last)
    assert status["shard"] == "done" and all(status[s] == "cached" for s in finished), status
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


@pytest.fixture(scope="module")
def teacher(reference, tmp_path_factory):
    """One uninterrupted tiny training run (flow, class-conditional) in a copy of the reference
    root: the train drill's reference and the teacher the distill and evaluate drills start from."""
    root = F.copy_root(reference[0], tmp_path_factory.mktemp("teacher") / "root")
    o = F.run(F.train_cmd(root, reference[1]["dataset_id"], "train.seed=1"))
    return root, _ok(o), o.seconds


def _drilled(d: F.Drill) -> None:
    """What every kill-and-rerun drill must show."""
    assert d.killed.sigkilled, (d.name, d.killed.returncode, d.killed.stderr[-3000:])
    assert d.rerun.returncode == 0, (d.name, d.rerun.stderr[-3000:])
    assert d.differing == [], (d.name, d.differing)
    assert d.reused and all(d.reused.values()), (d.name, d.reused, d.at_kill)
    assert d.leftovers == [], (d.name, d.leftovers)


@pytest.mark.slow
def test_train_killed_at_a_random_checkpoint_resumes_bit_identically(reference, teacher, tmp_path):
    """kill -9 of ``imagegen train`` once a random checkpoint is on disk (so mid-run: the run is
    not finished), rerun: it resumes from that checkpoint and the final checkpoint's tensors
    (model, EMA, optimizer, RNG) equal the uninterrupted run's, bit for bit."""
    root, out, _ = reference
    troot, straight, clean_s = teacher
    d = F.train_drill(root, out["dataset_id"], straight, clean_s, tmp_path, random.Random(3), "train.seed=1")
    assert d.at_kill["status"] == "running" and d.at_kill["checkpoints"], d.at_kill
    assert d.at_kill["k"] <= max(d.at_kill["checkpoints"]) < 24, d.at_kill
    _drilled(d)
    assert d.result["run_id"] == straight["run_id"] and d.result["start_step"] == max(d.at_kill["checkpoints"])


@pytest.mark.slow
def test_distill_killed_mid_student_resumes_bit_identically(teacher, tmp_path):
    """kill -9 of ``imagegen distill`` (reflow) once its student has a random checkpoint on disk,
    rerun: the pairs dataset is reused (same folder, same card), the student resumes from its
    checkpoint, and pairs, student tensors and NFE report equal an uninterrupted distillation's."""
    troot, straight, _ = teacher
    d = F.distill_drill(troot, straight["run_id"], tmp_path, random.Random(5))
    assert len(d.at_kill["pairs"]) == 1 and len(d.at_kill["students"]) == 1, d.at_kill
    student = next(iter(d.at_kill["students"].values()))
    assert student["status"] == "running" and not student["report"], d.at_kill
    assert d.at_kill["k"] <= max(student["checkpoints"]) < 12, d.at_kill
    _drilled(d)


@pytest.mark.slow
def test_evaluate_killed_mid_generation_resumes_bit_identically(teacher, tmp_path):
    """kill -9 of ``imagegen evaluate`` once a random number of its images are on disk, rerun:
    the batches finished before the kill are kept (same files), the rest generated, and every
    image and the metrics (FD, KID and their intervals) equal an uninterrupted evaluation's."""
    troot, straight, _ = teacher
    d = F.evaluate_drill(troot, straight["run_id"], tmp_path, random.Random(7))
    assert d.at_kill["n"] // 4 - 1 <= d.at_kill["batches"] and d.at_kill["images"] < 48, d.at_kill
    assert d.at_kill["complete"] == [] and d.at_kill["captions"] == [], d.at_kill
    _drilled(d)


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


@pytest.mark.slow
def test_a_curate_whose_every_row_fails_keeps_its_accounting_and_ledger(tmp_path):
    """Finding 10: when no input row survives, curate is refused (exit 2, no traceback) with a
    message saying where every row's outcome and the download ledger are, and both files are
    there with one row per input row."""
    import pandas as pd

    urls = tmp_path / "dead.jsonl"  # port 9 (discard) refuses the connection at once
    urls.write_text("".join(f'{{"url": "http://127.0.0.1:9/{c}.jpg", "caption": "{c}"}}\n' for c in "abc"))
    root = tmp_path / "root"
    p = subprocess.run([*IMAGEGEN, "curate", "--url-list", str(urls), "--set", "filter.clip_score=null",
                        "--set", "download.retry_passes=0", "--data-root", str(root), "--no-prefect"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout
    acc, led = sorted(root.glob("failed/*/accounting.parquet")), sorted(root.glob("failed/*/ledger.parquet"))
    assert len(acc) == len(led) == 1, sorted(str(x) for x in root.rglob("*"))
    assert str(acc[0]) in p.stderr and str(led[0]) in p.stderr, p.stderr[-3000:]
    a = pd.read_parquet(acc[0])
    assert len(a) == 3 and a["row_id"].nunique() == 3 and not (a["outcome"] == "kept").any(), a
    assert len(pd.read_parquet(led[0])) == 3
    assert not list((root / "datasets").glob("*/card.json"))  # an empty dataset is not a dataset


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


# family -> (--set overrides on the smoke preset, what the one refusal must name); every family
# config and the U-Net config with at least two independent mistakes
ALL_AT_ONCE = {
    "flow": (["train.model.net=unet", 'train.model.repa={"encoder":"world","layer":1}',
              "train.model.text_encoder=world", "train.model.logit_std=-1"],
             ["repa aligns transformer tokens", "text_encoder is only used with conditioning='text'",
              "train.model.logit_std"]),
    "edm": (["train.model.sigma_min=5", "train.model.sigma_max=1", "train.model.text_encoder=world",
             "train.model.image_size=2"],
            ["sigma_min 5.0 must be < sigma_max 1.0", "text_encoder is only used", "train.model.image_size"]),
    "gan": (["train.model.image_size=30", "train.model.conditioning=text", "train.model.num_classes=0",
             "train.model.text_encoder=world"],
            ["image_size 30 is not divisible by 2^levels", "conditioning is 'none' or 'class'"]),
    "vq": (["train.model.image_size=30", "train.model.fsq_levels=[1,5]"],
           ["image_size 30 is not divisible by 2^levels", "a tokenizer is unconditional",
            "every FSQ level count must be >= 2"]),
    "vqgan": (["train.model.image_size=30", "train.model.disc_weight=0"],
              ["image_size 30 is not divisible by 2^levels", "a tokenizer is unconditional", "disc_weight must be > 0"]),
    "ar": (["train.model.data=pixels", "train.model.hidden=30", "train.model.heads=4", "train.model.top_k=40",
            "train.model.vocab_size=32"],
           ["data must be 'latents'", "hidden 30 is not divisible by heads 4", "top_k 40 must be below vocab_size 32"]),
    "maskgit": (["train.model.data=pixels", "train.model.hidden=30", "train.model.heads=4"],
                ["data must be 'latents'", "hidden 30 is not divisible by heads 4"]),
    "msvq": (["train.model.scales=[4,2]", "train.model.fsq_levels=[1,5]"],
             ["scales must be positive and strictly increasing", "the last scale must be the latent side",
              "every FSQ level count must be >= 2"]),
    "dmd": (["train.model.t_min=0.5", "train.model.t_max=0.4", 'train.model.repa={"encoder":"world","layer":1}'],
            ["t_min 0.5 must be < t_max 0.4", "repa is a pre-training option"]),
    "ict": (["train.model.s0=10", "train.model.s1=5", "train.model.sigma_min=5", "train.model.sigma_max=1"],
            ["s1=5 must be >= s0=10", "sigma_min 5.0 must be < sigma_max 1.0"]),
    "diffusers_lora": (["train.model.pipeline=nodiffusers", "train.model.data=latents", "train.model.channels=4"],
                       ["is not a diffusers spec", "trains on RGB images"]),
    "lcm_lora": (["train.model.pipeline=diffusers:x", "train.model.guidance_min=3", "train.model.guidance_max=2",
                  "train.model.sample_steps=60", "train.model.ddim_steps=50"],
                 ["guidance_max=2.0 < guidance_min=3.0", "sample_steps=60 > ddim_steps=50"]),
    "ddpm": (['train.model.net_overrides={"model_channels":20,"norm_groups":8,"attention_resolutions":[5]}'],
             ["20 channels are not divisible by norm_groups 8", "attention_resolutions [5] are never reached"]),
}


@pytest.mark.parametrize("family", sorted(ALL_AT_ONCE))
def test_every_problem_of_a_family_config_is_named_in_one_refusal(family, tmp_path, capsys):
    """Finding 10, for every family's config and the network configs: a request with several
    independent mistakes is refused once (exit 2, no traceback, no data root) naming all of them."""
    from imagegen.cli import main

    sets, says = ALL_AT_ONCE[family]
    root = tmp_path / "root"
    rc = main(["train", "--preset", "smoke", "--set", f"train.family={family}",
               *[a for s in sets for a in ("--set", s)], "--data-root", str(root), "--no-prefect"])
    err = capsys.readouterr()
    assert rc == 2, err.err[-3000:]
    assert "Traceback" not in err.err + err.out
    missing = [s for s in says if s not in err.err]
    assert not missing, (missing, err.err[-3000:])
    assert not root.exists()


def test_every_problem_of_a_network_config_is_named_at_once():
    """The DiT and U-Net configs report all their shape problems together (not the first only)."""
    from pydantic import ValidationError

    from models.nets.dit import DiTConfig
    from models.nets.unet import UNetConfig

    with pytest.raises(ValidationError) as dit:
        DiTConfig(image_size=30, patch_size=4, hidden_size=30, num_heads=4, cross_attention=True)
    for says in ("cross_attention=True needs text_dim > 0", "image_size 30 is not divisible by patch_size 4",
                 "hidden_size 30 is not divisible by num_heads 4", "hidden_size 30 must be divisible by 4"):
        assert says in str(dit.value), (says, str(dit.value))
    with pytest.raises(ValidationError) as unet:
        UNetConfig(image_size=32, model_channels=20, norm_groups=8, attention_resolutions=(5,), dropout=2.0)
    for says in ("dropout", "20 channels are not divisible by norm_groups 8", "attention_resolutions [5] are never"):
        assert says in str(unet.value), (says, str(unet.value))
