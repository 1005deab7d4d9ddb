"""Fault drills on real processes: run an ``imagegen`` command in its own process group, kill -9
the whole group at a chosen point, rerun, and compare bytes with an undisturbed run.

Used by ``tests/test_faults.py`` (assertions) and ``benchmarks/bench_faults.py`` (figures).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
IMAGEGEN = [sys.executable, "-m", "imagegen.cli"]

# A curate request small enough to run a dozen times on 2 shared cores (about a minute idle).
TINY_CURATE = [
    "name=tiny", "source.publish.n_images=90", "source.publish.stall_seconds=2.5",
    "reference_clip.n_train=200", "reference_clip.n_heldout=40", "reference_clip.steps=12",
    "reference_clip.warmup_steps=2", "reference_clip.vision_width=64", "reference_clip.text_width=64",
    "reference_clip.head_width=32", "reference_clip.vision_layers=1", "reference_clip.text_layers=1",
    "download.timeout=1.5", "download.processes_count=1", "shard.target_shard_size=20",
    "filter.clip_score.threshold=-1.0",
]
# curate prints "[<stage>] done|cached <id> -> <path>" after each stage, in this order
CURATE_STAGES = ["world", "reference_clip", "download", "dedup", "filter", "recaption", "shard"]

TINY_TRAIN = [
    "train.model.image_size=16",
    'train.model.net_overrides={"model_channels":16,"norm_groups":8,"head_channels":16}',
    "train.batch_size=8", "train.warmup_steps=0", "train.ckpt_every=4", "train.log_every=1",
    "train.epoch_batches=4", "train.shuffle_buffer=16", "train.sample_count=4", "train.sample_steps=2",
    "train.steps=24",
]


def curate_cmd(root: Path, *extra: str) -> list[str]:
    sets = [a for kv in (*TINY_CURATE, *extra) for a in ("--set", kv)]
    return [*IMAGEGEN, "curate", "--preset", "smoke", *sets, "--data-root", str(root), "--no-prefect", "--json"]


def train_cmd(root: Path, dataset: str, *extra: str) -> list[str]:
    sets = [a for kv in (*TINY_TRAIN, *extra) for a in ("--set", kv)]
    return [*IMAGEGEN, "train", "--preset", "smoke", "--dataset", dataset, *sets, "--data-root", str(root),
            "--no-prefect", "--json"]


@dataclass
class Outcome:
    returncode: int
    seconds: float
    stderr: str
    stdout: str
    killed: bool = False
    result: dict[str, Any] | None = None
    stage_lines: list[str] = field(default_factory=list)
    kill_at: float | None = None  # seconds after start when the SIGKILL was sent

    @property
    def sigkilled(self) -> bool:
        """The process ended by the drill's SIGKILL (not by finishing first, nor by an error)."""
        return self.kill_at is not None and self.returncode == -signal.SIGKILL


def _env(env: dict[str, str] | None) -> dict[str, str]:
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return {**base, **(env or {})}


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800,
        kill_after_line: str | None = None, delay: float = 0.0,
        kill_when: Callable[[], bool] | None = None, poll: float = 0.005) -> Outcome:
    """Run ``cmd`` in a new process group.  SIGKILL the whole group ``delay`` seconds after the
    first stderr line starting with ``kill_after_line``, or after ``kill_when()`` (polled every
    ``poll`` seconds) first returns True: a condition on the run's files (a temporary folder, a
    checkpoint, generated images) says where the run is, a progress line only when it was printed.
    The run may finish first: ``killed`` says whether the kill landed, and a drill that must prove
    a kill checks ``returncode == -SIGKILL`` and that the artifact is incomplete."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    out_chunks: list[str] = []
    reader = threading.Thread(target=lambda: out_chunks.append(p.stdout.read()), daemon=True)
    reader.start()
    err_lines: list[str] = []
    sent: list[float] = []
    lock = threading.Lock()

    def kill() -> None:
        with lock:
            if sent:
                return
            try:
                os.killpg(p.pid, signal.SIGKILL)
                sent.append(time.perf_counter() - t0)
            except ProcessLookupError:
                pass

    def watch() -> None:
        while p.poll() is None:
            try:
                hit = kill_when()
            except OSError:  # a folder renamed or removed while looked at
                hit = False
            if hit:
                if delay:
                    time.sleep(delay)
                kill()
                return
            time.sleep(poll)

    watcher = None
    if kill_when is not None:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    deadline = t0 + timeout
    for line in p.stderr:
        err_lines.append(line)
        if kill_after_line is not None and not sent and line.startswith(kill_after_line):
            time.sleep(delay)
            kill()
        if time.perf_counter() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            raise TimeoutError(f"{cmd} ran past {timeout} s")
    p.wait()
    if watcher is not None:
        watcher.join(timeout=10)
    reader.join(timeout=10)
    try:  # pool workers of a killed group may outlive the leader for a moment
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    stdout = "".join(out_chunks)
    res = None
    if p.returncode == 0 and stdout.strip():
        try:
            res = json.loads(stdout.strip().splitlines()[-1])
        except ValueError:
            res = None
    err = "".join(err_lines)
    return Outcome(p.returncode, time.perf_counter() - t0, err, stdout, bool(sent) and p.returncode != 0, res,
                   [ln.strip() for ln in err_lines if ln.startswith("[")], sent[0] if sent else None)


def stage_status(outcome: Outcome) -> dict[str, str]:
    """``{stage: "done" | "cached"}`` from curate's progress lines."""
    got = {}
    for ln in outcome.stage_lines:
        name, _, rest = ln[1:].partition("] ")
        if name in CURATE_STAGES:
            got[name] = rest.split(" ", 1)[0]
    return got


def digests(folder: str | Path, exclude: tuple[str, ...] = ("card.json", "samples.png")) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex), minus ``exclude`` names
    (the card holds wall-clock timings, by design)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


def dataset_digests(path: str | Path) -> dict[str, str]:
    """Shards (tar, parquet, stats), manifest and accounting of a dataset folder."""
    d = Path(path)
    files = sorted([*(d / "shards").iterdir(), d / "manifest.parquet", d / "accounting.parquet"])
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def checkpoint_tensors(run_dir: str | Path) -> dict[str, str]:
    """sha256 of each tensor of the run's newest checkpoint (model, EMA, optimizer, RNG)."""
    from safetensors.torch import load_file

    from imagegen.train.checkpoint import TENSORS, latest_checkpoint

    ck = latest_checkpoint(Path(run_dir))
    tensors = load_file(str(ck / TENSORS))
    return {k: hashlib.sha256(v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
                              ).hexdigest() for k, v in sorted(tensors.items())}


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders under ``root`` (there must be none after a finished run)."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if ".tmp-" in p.name or p.name.endswith(".part"))


def random_delay(rng: random.Random, upto: float) -> float:
    return round(rng.uniform(0, upto), 2)


# ------------------------------------------------------------------------------------------ where a run is

# where each curate stage writes: its temporary folder ``<id>.tmp-<pid>-...`` is there while it works
STAGE_PARENTS = {"world": "stages/world", "reference_clip": "models/reference_clip", "download": "stages/download",
                 "dedup": "stages/dedup", "filter": "stages/filter", "recaption": "stages/recaption",
                 "shard": "datasets"}
_STEP = re.compile(r"^step_(\d+)$")


def _dirs(parent: Path) -> list[Path]:
    try:
        return [p for p in Path(parent).iterdir() if p.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def writing(parent: Path) -> Callable[[], bool]:
    """Condition: a temporary output folder is under ``parent`` (the stage writing there is mid-work)."""
    return lambda: any(".tmp-" in p.name for p in _dirs(parent))


def complete(parent: Path) -> list[str]:
    """Names of the complete (``card.json``) output folders under ``parent``."""
    return sorted(p.name for p in _dirs(parent) if ".tmp-" not in p.name and (p / "card.json").is_file())


def stage_seconds(root: Path) -> dict[str, float]:
    """Each curate stage's recorded seconds in a data root holding one complete run."""
    out = {}
    for stage, sub in STAGE_PARENTS.items():
        for name in complete(Path(root) / sub):
            s = json.loads((Path(root) / sub / name / "card.json").read_text()).get("seconds")
            out[stage] = float(s["total"] if isinstance(s, dict) else s or 0.0)
    return out


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run (a ``step_<n>`` folder appears by rename)."""
    return sorted(int(m.group(1)) for p in _dirs(Path(run_dir) / "checkpoints") if (m := _STEP.match(p.name)))


def checkpoint_reached(runs: Path, step: int, exclude: tuple[str, ...] = ()) -> Callable[[], bool]:
    """Condition: a run under ``runs`` (other than ``exclude``) has a checkpoint at ``step`` or later."""
    return lambda: any(s >= step for r in _dirs(runs) if r.name not in exclude for s in checkpoint_steps(r))


def images_generated(evals: Path) -> int:
    """Images written so far into the generated sets (``evals/<id>/samples/*.png``)."""
    return sum(1 for e in _dirs(evals) for f in _files(e / "samples") if f.endswith(".png") and not f.startswith("."))


def _files(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def copy_root(src: Path, dst: Path, *skip: str) -> Path:
    """A copy of a data root (what an earlier run would have left), without the top-level ``skip`` folders."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == Path(src) and n in skip])
    return dst


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ------------------------------------------------------------------------------------------ drills


@dataclass
class Drill:
    """One kill-and-rerun drill: the killed run, what was on disk at the kill, the rerun, and the
    comparison with an uninterrupted run of the same request."""

    name: str
    killed: Outcome
    rerun: Outcome
    at_kill: dict[str, Any]          # evidence that the run was mid-work (the artifact incomplete)
    differing: list[str]             # files / tensors whose bytes differ from the uninterrupted run's
    reused: dict[str, bool]          # complete parts the rerun reused instead of recomputing
    leftovers: list[str]             # temporaries left after the rerun
    clean_s: float                   # the uninterrupted run's wall time
    recover_s: float                 # the rerun's wall time

    @property
    def result(self) -> dict[str, Any]:
        return self.rerun.result or {}


def train_drill(clean_root: Path, dataset: str, straight: dict[str, Any], clean_s: float, work: Path,
                rng: random.Random, *extra: str) -> Drill:
    """kill -9 ``imagegen train`` once it has written a random checkpoint (TINY_TRAIN: every 4 of
    24 steps), in a copy of ``clean_root`` without its runs; rerun; compare the last checkpoint's
    tensors with ``straight`` (the uninterrupted run of the same request, in ``clean_root``)."""
    root = copy_root(clean_root, work / "train", "runs")
    k = rng.choice([4, 8, 12, 16])
    cmd = train_cmd(root, dataset, *extra)
    killed = run(cmd, kill_when=checkpoint_reached(root / "runs", k))
    run_dir = root / "runs" / straight["run_id"]
    at_kill = {"k": k, "status": _read_json(run_dir / "card.json").get("status"),
               "checkpoints": checkpoint_steps(run_dir)}
    rerun = run(cmd)
    res = rerun.result or {}
    diff = ["(rerun failed)"]
    if res:
        diff = _differing(checkpoint_tensors(straight["run_dir"]), checkpoint_tensors(res["run_dir"]))
    return Drill(f"kill -9 train at checkpoint >= {k}", killed, rerun, at_kill, diff,
                 {"checkpoint": bool(at_kill["checkpoints"]) and res.get("start_step") == max(at_kill["checkpoints"])},
                 leftovers(root / "runs"), clean_s, rerun.seconds)


TINY_DISTILL = ["steps=12", "batch_size=8", "pairs=32", "pair_steps=3", "report_count=2", "report_nfe=[1,2]"]


def distill_cmd(root: Path, teacher: str, *extra: str) -> list[str]:
    sets = [a for kv in (*TINY_DISTILL, *extra) for a in ("--set", kv)]
    return [*IMAGEGEN, "distill", "--teacher", teacher, "--method", "reflow", *sets, "--data-root", str(root),
            "--no-prefect", "--json"]


def _report_digests(summary: dict[str, Any]) -> dict[str, str]:
    """The NFE report's files and its table without the wall-clock cost column."""
    import pandas as pd

    folder = Path(summary["report"]["table"]).parent
    out = digests(folder, exclude=("card.json", "report.parquet"))
    table = pd.read_parquet(folder / "report.parquet").drop(columns=["train_seconds", "grid"], errors="ignore")
    out["report.parquet (without train_seconds)"] = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
    return out


def distill_drill(teacher_root: Path, teacher: str, work: Path, rng: random.Random) -> Drill:
    """Reflow distillation (pairs, student run, NFE report) of the finished ``teacher`` run:
    uninterrupted in one copy of ``teacher_root``; in another, kill -9 once the student has
    written a random checkpoint (every 4 of its 12 steps), then rerun.  Compared: the pairs
    dataset, the student's last checkpoint tensors, the NFE report (grids, table)."""
    clean = copy_root(teacher_root, work / "distill-clean")
    t0 = time.perf_counter()
    straight = run(distill_cmd(clean, teacher))
    clean_s = time.perf_counter() - t0
    root = copy_root(teacher_root, work / "distill")
    k = rng.choice([4, 8])
    killed = run(distill_cmd(root, teacher), kill_when=checkpoint_reached(root / "runs", k, exclude=(teacher,)))
    students = [r for r in _dirs(root / "runs") if r.name != teacher]
    pairs = [d for d in complete(root / "datasets") if _read_json(root / "datasets" / d / "card.json").get("kind")
             == "reflow_pairs"]
    at_kill = {"k": k, "students": {r.name: {"status": _read_json(r / "card.json").get("status"),
                                             "checkpoints": checkpoint_steps(r),
                                             "report": bool(list((r / "distill_report").glob("*/card.json")))}
                                    for r in students},
               "pairs": pairs}
    before = {d: (os.stat(root / "datasets" / d).st_ino, _read_json(root / "datasets" / d / "card.json")
                  .get("created_unix")) for d in pairs}
    rerun = run(distill_cmd(root, teacher))
    a, b = straight.result or {}, rerun.result or {}
    diff = ["(a run failed)"]
    reused: dict[str, bool] = {}
    if a and b:
        diff = [f"student {x}" for x in _differing(checkpoint_tensors(Path(a["student_checkpoint"]).parents[1]),
                                                    checkpoint_tensors(Path(b["student_checkpoint"]).parents[1]))]
        diff += [f"pairs {x}" for x in _differing(digests(clean / "datasets" / a["dataset_id"]),
                                                   digests(root / "datasets" / b["dataset_id"]))]
        diff += [f"report {x}" for x in _differing(_report_digests(a), _report_digests(b))]
        if a["student_run"] != b["student_run"] or a["dataset_id"] != b["dataset_id"]:
            diff.append("ids")
        after = {d: (os.stat(root / "datasets" / d).st_ino, _read_json(root / "datasets" / d / "card.json")
                     .get("created_unix")) for d in pairs}
        ckpts = at_kill["students"].get(b["student_run"], {}).get("checkpoints") or [0]
        start = _read_json(root / "runs" / b["student_run"] / "card.json").get("summary", {}).get("start_step")
        reused = {"pairs": bool(pairs) and before == after, "student checkpoint": start == max(ckpts) > 0}
    return Drill(f"kill -9 distill at student checkpoint >= {k}", killed, rerun, at_kill, diff, reused,
                 leftovers(root / "runs") + leftovers(root / "datasets"), clean_s, rerun.seconds)


TINY_EVAL = ["n_samples=48", "batch_size=4", "steps=3", "kid_subsets=5", "kid_subset_size=8", "n_resamples=20"]


def evaluate_cmd(root: Path, run_id: str, *extra: str) -> list[str]:
    sets = [a for kv in (*TINY_EVAL, *extra) for a in ("--set", kv)]
    return [*IMAGEGEN, "evaluate", "--run", run_id, "--metrics", "fid", *sets, "--data-root", str(root),
            "--no-prefect", "--json"]


def _eval_digests(summary: dict[str, Any]) -> dict[str, str]:
    """The generated set (every PNG, captions) and the metric values and intervals."""
    folder = Path(summary["path"])
    # generate.json records the generation's seconds (and its NFE, compared below), like a card
    out = {f"samples/{k}": v for k, v in digests(folder / "samples", exclude=("generate.json",)).items()
           if not k.startswith(".")}
    out["metrics"] = hashlib.sha256(json.dumps({k: summary.get(k) for k in ("metrics", "intervals", "nfe", "steps",
                                                                            "n_samples")},
                                               sort_keys=True).encode()).hexdigest()
    return out


def evaluate_drill(teacher_root: Path, run_id: str, work: Path, rng: random.Random) -> Drill:
    """``imagegen evaluate --metrics fid`` of ``run_id``: uninterrupted in one copy of
    ``teacher_root``; in another, kill -9 once a random number of its 12 batches of images are
    on disk, then rerun.  Compared: every generated PNG and the metric values and intervals; the
    batches complete at the kill must be kept, not generated again."""
    clean = copy_root(teacher_root, work / "evaluate-clean", "evals")
    t0 = time.perf_counter()
    straight = run(evaluate_cmd(clean, run_id))
    clean_s = time.perf_counter() - t0
    root = copy_root(teacher_root, work / "evaluate", "evals")
    n = rng.choice([8, 16, 24])  # images; 4 per batch, so the batches before the last are recorded
    killed = run(evaluate_cmd(root, run_id), kill_when=lambda: images_generated(root / "evals") >= n)
    sets = [e for e in _dirs(root / "evals") if (e / "samples").is_dir()]
    batches = [(e, int(r.stem)) for e in sets for r in sorted((e / "samples" / ".batches").glob("*.json"))]
    kept = {}  # the images of the batches recorded as finished: these must not be generated again
    for e, start in batches:
        for i in range(start, start + 4):
            f = e / "samples" / f"{i:05d}.png"
            kept[f"{e.name}/{f.name}"] = (f.stat().st_ino, f.stat().st_mtime_ns)
    at_kill = {"n": n, "images": images_generated(root / "evals"), "batches": len(batches),
               "complete": [e.name for e in sets if (e / "card.json").is_file()],
               "captions": [e.name for e in sets if (e / "samples" / "captions.jsonl").is_file()]}
    rerun = run(evaluate_cmd(root, run_id))
    a, b = straight.result or {}, rerun.result or {}
    diff = ["(a run failed)"]
    reused: dict[str, bool] = {}
    if a and b:
        diff = _differing(_eval_digests(a), _eval_digests(b))
        if a["eval_id"] != b["eval_id"]:
            diff.append("ids")
        now = {}
        for key in kept:
            f = root / "evals" / key.split("/")[0] / "samples" / key.split("/")[1]
            now[key] = (f.stat().st_ino, f.stat().st_mtime_ns) if f.is_file() else None
        reused = {"images on disk at the kill": bool(kept) and now == kept}
    return Drill(f"kill -9 evaluate after {n}+ of 48 images", killed, rerun, at_kill, diff, reused,
                 leftovers(root / "evals"), clean_s, rerun.seconds)


def kill_curate_in(root: Path, stage: str, delay: float, *extra: str) -> tuple[Outcome, dict[str, Any]]:
    """Run the tiny curate in ``root`` and kill -9 it ``delay`` seconds after ``stage`` starts
    writing its output (its temporary folder appears); returns the outcome and what was on disk
    at the kill (the stage's complete folders: none if the kill landed mid-stage)."""
    parent = Path(root) / STAGE_PARENTS[stage]
    o = run(curate_cmd(root, *extra), kill_when=writing(parent), delay=delay)
    return o, {"stage": stage, "delay": delay, "complete": complete(parent)}
