"""Distillation: few-step students from trained teachers, as ordinary training runs.

Each method is a family (models/progressive.py, reflow.py, consistency.py) trained by the
generic trainer through the run registry (imagegen/train/runs.py), so students get EMA,
checkpoints, resume, bf16, DDP and Prefect artifacts for free, and a student checkpoint is a
checkpoint like any other (its family knows its own default sampler and step count).

``distill(request, root)``:

* progressive: rounds N0/2, N0/4, ..., target steps; round k's teacher is round k-1's student
  (the first round's is the teacher run), each round initialised from its teacher.
* reflow: ``reflow_pairs`` draws (noise seed, teacher ODE sample) couplings into a registered
  dataset (content-addressed, so other students reuse it), then a reflow student trains on it.
* consistency: one run with an EDM teacher.
* dmd: distribution matching (models/dmd.py) of a flow teacher into a one-step generator, on the
  same (content-addressed, shared) reflow pairs for its regression loss.
* ict: consistency *training* (models/ict.py): no teacher; the EDM run named as teacher gives the
  dataset and the network config (trained from scratch) and is the report's reference.

Then ``nfe_report`` samples teacher and students from the same noise at NFE 1, 2, 4, 8 (teacher
also at 50) and writes grids, the MSE of every row to the teacher at 50 steps and a plot; every
student row carries the method's cost (``distill_cost``: teacher network evaluations, student
optimizer steps, seconds).  ``nfe_table`` puts several distillations in one table.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
import torch

from imagegen import distill_config
from imagegen.artifacts import is_complete, stage_output
from imagegen.determinism import DEFAULT_THREADS, torch_threads
from imagegen.distill_config import DistillRequest  # noqa: F401 (re-exported)
from imagegen.hashing import code_version, stable_hash
from imagegen.paths import datasets_dir
from imagegen.registry import get_dataset, register_name
from imagegen.train.runs import RunError, TrainRequest, get_run, train_run
from imagegen.train.trainer import TrainConfig, sample_conditioning, save_grid
from models.teacher import METHODS, REFERENCE_ONLY, TEACHERS, Method, lacks_v_prediction, teacher_families  # noqa: F401


# ------------------------------------------------------------------------------------------ teacher


def teacher_run(root: Path, run_id: str, method: str) -> tuple[Any, TrainConfig]:
    """The finished teacher run and its config; refuses a teacher the method cannot use.  For
    lcm_lora: (the pipeline's (folder, identity), the student's TrainConfig), everything checked."""
    if method == "lcm_lora":
        return _lcm_teacher(root, run_id)
    ref = get_run(root, run_id)
    if ref.card.get("status") != "finished" or ref.checkpoint is None:
        raise RunError(f"teacher run {ref.id} is {ref.card.get('status')!r}, not finished: train it to the end first")
    cfg = TrainConfig(**ref.card["config"])
    fam = cfg.family
    if fam not in teacher_families(method):
        why = {"progressive": "a DDPM family run in v-prediction (DDIM teacher)",
               "reflow": "a flow-matching run (an ODE sampler on the linear path)",
               "consistency": "an EDM run (sigma parameterisation with Heun ODE steps)",
               "dmd": "a flow-matching run (its velocity is the real score)",
               "ict": "an EDM run (its dataset and network; iCT itself trains without a teacher)"}[method]
        raise RunError(f"{method} distillation needs {why}; teacher run {ref.id} is family {fam!r}")
    if lacks_v_prediction(method, fam, cfg.model):
        raise RunError(f"progressive distillation needs a v-prediction teacher; run {ref.id} predicts "
                       f"{cfg.model.get('prediction')!r} (train the teacher with model.prediction=v)")
    return ref, cfg


def _lcm_teacher(root: Path, spec: str) -> tuple[dict[str, Any], None]:
    """A diffusers pipeline an LCM-LoRA student can be distilled from: its identity (checked:
    a pipeline folder of safetensors with a UNet and a discrete-time scheduler); nothing loaded."""
    import json

    from models.hf_diffusers import DiffusersError, resolve_spec

    try:
        path, identity = resolve_spec(spec)
    except DiffusersError as exc:
        raise RunError(str(exc)) from None
    mi = json.loads((path / "model_index.json").read_text())
    sched = path / "scheduler" / "scheduler_config.json"
    if not mi.get("unet") or not sched.is_file() or "num_train_timesteps" not in json.loads(sched.read_text()):
        raise RunError(f"lcm_lora distils a UNet pipeline with a discrete-time (DDPM-family) scheduler; {spec} is a "
                       f"{mi.get('_class_name')} without one")
    return {"path": str(path), **identity}, None


def student_request(request: DistillRequest, teacher_id: str, teacher_cfg: TrainConfig, dataset: str,
                    model_extra: dict[str, Any], label: str) -> TrainRequest:
    """The student's TrainRequest: the teacher's training config with the method's family, the
    teacher's network, and the request's optimisation settings."""
    data = teacher_cfg.model_dump(mode="json")
    fields = _base_fields(request.method)
    model = {k: v for k, v in data["model"].items() if k in fields}
    model.update(model_extra)
    if "teacher" in fields:  # iCT has none: the run only lends its data and network config
        model["teacher"] = f"run:{teacher_id}"
    data.update(family=request.method, model=model, steps=request.steps, warmup_steps=request.warmup_steps,
                schedule="constant", ckpt_every=min(data.get("ckpt_every", 1000), request.steps),
                sample_steps=None, sample_sampler=None)
    for k in ("lr", "batch_size", "ema_decay"):
        if getattr(request, k) is not None:
            data[k] = getattr(request, k)
    if request.method in ("reflow", "dmd"):  # the pairs dataset carries captions, not the teacher's labels field
        data["sample_guidance"] = 1.0 if model.get("conditioning", "none") == "none" else data["sample_guidance"]
    try:
        cfg = TrainConfig(**data)
    except ValueError as exc:
        raise RunError(f"{label}: the student config built from the teacher is invalid: {exc}") from exc
    return TrainRequest(dataset=dataset, train=cfg, nproc=request.nproc)


def _base_fields(method: str) -> set[str]:
    from models.registry import get_family

    return set(get_family(method).Config.model_fields)


# ------------------------------------------------------------------------------------------ reflow pairs


def reflow_pairs(root: Path, teacher_id: str, teacher_cfg: TrainConfig, n: int, steps: int, sampler: str,
                 guidance: float, seed: int, name: str | None = None,
                 progress: Callable[[int, int], None] | None = None, threads: int = DEFAULT_THREADS) -> str:
    """Draw ``n`` (noise seed, teacher ODE sample) couplings into a registered dataset; returns its id.

    Conditions are captions drawn (seeded) from the teacher's own training dataset, so a class
    teacher's labels (from caption keywords or fields) and a text teacher's prompts carry over.
    The dataset id hashes the teacher run, the settings, the torch thread count the teacher samples
    on (``threads``: CPU float reductions split by it) and this code: rerunning reuses it."""
    from models.reflow import NOISE_KEY, pair_noise
    from models.checkpoint import load_family

    ref = get_run(root, teacher_id)
    ds = get_dataset(root, ref.card["dataset_id"])
    ident = {"teacher": ref.id, "n": n, "steps": steps, "sampler": sampler, "guidance": guidance, "seed": seed,
             "threads": threads,
             "code": code_version(__import__("models.reflow", fromlist=["x"]), _code_self(), distill_config)}
    dataset_id = stable_hash(ident)
    final = datasets_dir(root) / dataset_id
    label = name or f"reflow-{ref.id[:8]}"
    if is_complete(final):
        register_name(root, label, dataset_id)
        return dataset_id
    manifest = pd.read_parquet(ds.path / "manifest.parquet", columns=["key", "caption"]).sort_values("key")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(manifest), size=n)
    captions = manifest["caption"].astype(str).to_numpy()[picks].tolist()
    seeds = rng.integers(0, 2**62, size=n).tolist()
    teacher = load_family(ref.checkpoint)
    c = teacher_cfg.model
    shape = (int(c.get("channels", 3)), int(c["image_size"]), int(c["image_size"]))
    conditioning = c.get("conditioning", "none")
    labeler = None
    if conditioning == "class":
        from imagegen.train.trainer import Labeler

        labeler = Labeler(teacher_cfg)
    samples = []
    with stage_output(final) as (tmp, card), torch_threads(threads):
        t0 = time.time()
        for start in range(0, n, 64):
            idx = list(range(start, min(n, start + 64)))
            x_T = pair_noise([seeds[i] for i in idx], shape)
            cond: Any = None
            if conditioning == "text":
                cond = [captions[i] for i in idx]
            elif labeler is not None:
                cond = torch.tensor([labeler.label(captions[i], None, f"pair {i}") for i in idx])
            g = 1.0 if cond is None else guidance
            with torch.no_grad():
                x = teacher.sample(len(idx), conditioning=cond, sampler=sampler, steps=steps, guidance=g, x_T=x_T)
            u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for j, i in enumerate(idx):
                buf = io.BytesIO()
                from PIL import Image

                Image.fromarray(u8[j]).save(buf, format="PNG")
                samples.append({"key": f"{i:09d}", "image": buf.getvalue(), "ext": "png", "caption": captions[i],
                                "meta": {NOISE_KEY: int(seeds[i]), "teacher_run": ref.id}})
            if progress is not None:
                progress(min(n, start + 64), n)
        from imagegen.stages.shard import ShardConfig, write_shards

        write_shards(samples, tmp / "shards", ShardConfig(target_shard_size=1000, shuffle_seed=seed))
        pd.DataFrame([{"key": s["key"], "caption": s["caption"], NOISE_KEY: s["meta"][NOISE_KEY]}
                      for s in samples]).to_parquet(tmp / "manifest.parquet", index=False)
        card.update(id=dataset_id, name=label, kind="reflow_pairs", inputs=ident, stage_ids={},
                    source={"kind": "reflow_pairs", "teacher_run": ref.id, "teacher_dataset": ds.id},
                    counts={"shard": {"samples": n}}, seconds=round(time.time() - t0, 3))
    register_name(root, label, dataset_id)
    return dataset_id


def _code_self() -> Any:
    import sys

    return sys.modules[__name__]


# ------------------------------------------------------------------------------------------ report


REPORT_TEACHER_STEPS = 50  # the NFE report's reference: the teacher at this many steps


COST_COLUMNS = ("teacher_calls", "student_steps", "train_seconds")


def _pair_calls(request: DistillRequest, conditional: bool, guidance: float) -> int:
    """Teacher network evaluations of the reflow pairs: Heun takes 2N - 1 (its last step is Euler),
    Euler N; CFG evaluates both branches."""
    per = 2 * request.pair_steps - 1 if request.pair_sampler == "heun" else request.pair_steps
    return request.pairs * per * (2 if conditional and guidance != 1.0 else 1)


def distill_cost(request: DistillRequest, teacher_cfg: TrainConfig, rounds: list[dict[str, Any]],
                 pairs_seconds: float = 0.0) -> dict[str, Any]:
    """What a distillation cost: teacher network evaluations (one image through the teacher's net;
    a CFG pair counts 2), student optimizer steps over all rounds, and the seconds of its runs
    (wall clock of the student runs and of drawing the pairs, as recorded when they ran).

    Per method: progressive 2 DDIM teacher steps per sample and step; reflow the pairs; consistency
    one Heun step (2 denoiser calls, each one teacher evaluation, 2 with CFG: cond and uncond in one
    doubled batch) per sample and step; dmd the pairs plus one real-score evaluation (2 with CFG) per
    sample and step; ict none."""
    batch = request.batch_size or teacher_cfg.batch_size
    steps = request.steps * len(rounds)
    conditional = teacher_cfg.model.get("conditioning", "none") != "none"
    learned, _ = request.guidance(conditional, teacher_cfg.sample_guidance)
    guided = conditional and learned != 1.0
    m = request.method
    if m == "progressive":
        calls = 2 * batch * steps
    elif m == "reflow":
        calls = _pair_calls(request, conditional, learned)
    elif m == "consistency":
        calls = batch * steps * 2 * (2 if guided else 1)
    elif m == "dmd":
        pair_g = request.pair_guidance if request.pair_guidance is not None else teacher_cfg.sample_guidance
        calls = _pair_calls(request, conditional, pair_g) + batch * steps * (2 if guided else 1)
    elif m == "lcm_lora":  # teacher_substeps DDIM steps per sample and step, CFG as one doubled batch of 2
        guided = request.teacher_guidance != 1.0 or (request.teacher_guidance_max or 1.0) != 1.0
        calls = batch * steps * int(teacher_cfg.model.get("teacher_substeps", 1)) * (2 if guided else 1)
    else:
        calls = 0
    seconds = sum(float(r.get("seconds") or 0.0) for r in rounds) + float(pairs_seconds)
    return {"teacher_calls": int(calls), "student_steps": int(steps), "train_seconds": round(seconds, 3)}


def nfe_report(models: list[tuple[str, Any, float]], out_dir: Path, cfg: TrainConfig, nfes: tuple[int, ...],
               count: int, seed: int, teacher_steps: int = REPORT_TEACHER_STEPS,
               cost: dict[str, dict[str, Any]] | None = None, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """Sample every (label, family, CFG scale) at each NFE from the same noise and conditioning;
    the first model is the teacher, also sampled at ``teacher_steps`` as the reference.  Writes
    one grid per row, ``report.parquet`` (label, steps, nfe, guidance, mse to the reference, and the
    cost columns from ``cost[label]``, 0 where none is given) and ``nfe_mse.png``.  A one-step
    generator (DMD) is sampled at NFE 1 only.  Everything samples on ``threads`` torch threads."""
    with torch_threads(threads):
        return _nfe_report(models, out_dir, cfg, nfes, count, seed, teacher_steps, cost)


def _nfe_report(models: list[tuple[str, Any, float]], out_dir: Path, cfg: TrainConfig, nfes: tuple[int, ...],
                count: int, seed: int, teacher_steps: int, cost: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher, teacher_g = models[0][1], models[0][2]
    shape = (count, *teacher.noise_shape)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    cond = sample_conditioning(cfg, count)

    def draw(fam: Any, steps: int, guidance: float) -> tuple[torch.Tensor, int]:
        res = fam.sample_result(count, conditioning=cond, steps=steps, guidance=guidance if cond is not None else 1.0,
                                x_T=x_T, generator=torch.Generator().manual_seed(seed + 1))
        return res.sample.float(), int(res.nfe)

    cost = cost or {}

    def costs(label: str) -> dict[str, Any]:
        c = cost.get(label, {})
        return {k: c.get(k, 0) for k in COST_COLUMNS}

    ref, ref_nfe = draw(teacher, teacher_steps, teacher_g)
    rows = [{"model": models[0][0], "steps": teacher_steps, "nfe": ref_nfe, "guidance": teacher_g,
             "mse_to_reference": 0.0, "grid": str(out_dir / f"{models[0][0]}_steps{teacher_steps}.png"),
             **costs(models[0][0])}]
    save_grid(ref, Path(rows[0]["grid"]))
    for label, fam, g in models:
        done: set[int] = set()
        for nfe in nfes:
            # the most steps whose NFE fits the budget: Heun costs 2N - 1 (its last step is Euler)
            steps = max(1, (nfe + 1) // 2) if fam.default_sampler == "heun" else nfe
            if steps in done or (fam.default_sampler == "onestep" and steps != 1):
                continue
            done.add(steps)
            x, used = draw(fam, steps, g)
            path = out_dir / f"{label}_steps{steps}.png"
            save_grid(x, path)
            rows.append({"model": label, "steps": steps, "nfe": used, "guidance": g,
                         "mse_to_reference": float(((x - ref) ** 2).mean()), "grid": str(path), **costs(label)})
    df = pd.DataFrame(rows)
    df.to_parquet(out_dir / "report.parquet", index=False)
    _plot(df, out_dir / "nfe_mse.png", models[0][0], ref_nfe)
    return {"rows": rows, "plot": str(out_dir / "nfe_mse.png"), "table": str(out_dir / "report.parquet")}


def read_nfe_report(out_dir: Path) -> dict[str, Any]:
    """What ``nfe_report`` returned, read back from its folder (paths point into ``out_dir``)."""
    rows = pd.read_parquet(out_dir / "report.parquet").to_dict("records")
    for r in rows:
        r["grid"] = str(out_dir / Path(r["grid"]).name)
        r["steps"], r["nfe"], r["mse_to_reference"] = int(r["steps"]), int(r["nfe"]), float(r["mse_to_reference"])
        r["guidance"] = float(r["guidance"])
        for k in COST_COLUMNS:  # reports written before the cost columns read as 0
            r[k] = float(r[k]) if k == "train_seconds" and k in r else int(r.get(k, 0) or 0)
    return {"rows": rows, "plot": str(out_dir / "nfe_mse.png"), "table": str(out_dir / "report.parquet")}


def nfe_table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """One NFE table over several distillations (summaries of :func:`distill`, e.g. reflow, dmd,
    consistency, ict, progressive from their teachers): per student sample row its method, teacher
    run, steps, NFE, MSE to its teacher at 50 steps and the cost columns; each teacher's own
    reference row once."""
    rows, teachers = [], set()
    for sm in summaries:
        for r in sm["report"]["rows"]:
            is_teacher = r["model"] == "teacher"
            if is_teacher and (sm["teacher_run"], r["steps"]) in teachers:
                continue
            if is_teacher:
                teachers.add((sm["teacher_run"], r["steps"]))
            rows.append({"method": "teacher" if is_teacher else sm["method"], "teacher_run": sm["teacher_run"],
                         "run_id": sm["teacher_run"] if is_teacher else sm["student_run"], "steps": int(r["steps"]),
                         "nfe": int(r["nfe"]), "mse_to_teacher": float(r["mse_to_reference"]),
                         **{k: r.get(k, 0) for k in COST_COLUMNS}})
    return pd.DataFrame(rows)


def nfe_table_markdown(df: pd.DataFrame) -> str:
    """The NFE table as markdown (teacher calls: teacher network evaluations; seconds: wall clock of the student runs
    and their pairs)."""
    lines = ["| method | teacher run | NFE | MSE to teacher | teacher calls | train steps | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in df.to_dict("records"):
        lines.append(f"| {r['method']} | `{r['teacher_run'][:10]}` | {r['nfe']} | {r['mse_to_teacher']:.5f} | "
                     f"{r['teacher_calls']:,} | {r['student_steps']:,} | {float(r['train_seconds']):.1f} |")
    return "\n".join(lines)


def _plot(df: pd.DataFrame, png: Path, teacher: str, ref_nfe: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for label, g in df[df["mse_to_reference"] > 0].groupby("model", sort=False):
        ax.plot(g["nfe"], g["mse_to_reference"], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"MSE to {teacher} at NFE {ref_nfe}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ distill


def distill(request: DistillRequest | dict[str, Any], root: Path | str,
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the method's student run(s) and the NFE report; returns a summary (ids and paths)."""
    if not isinstance(request, DistillRequest):
        request = DistillRequest(**request)
    root = Path(root)
    if request.method == "lcm_lora":
        return distill_lcm_lora(request, root, progress)
    ref, tcfg = teacher_run(root, request.teacher, request.method)
    if request.method == "progressive":
        have = ref.card["config"]["model"]
        if have.get("timesteps", 1000) % (request.start_steps) and have.get("spacing", "trailing") != "trailing":
            raise RunError(f"progressive: a {request.start_steps}-step teacher grid must contain the student grids; "
                           "use a teacher with spacing='trailing'")
    t0 = time.time()
    rounds = []
    pairs_seconds = 0.0
    teacher_id, dataset = ref.id, ref.card["dataset_id"]
    extra_for: Callable[[int], dict[str, Any]]
    if request.method == "progressive":
        extra_for = lambda n: {"student_steps": n}  # noqa: E731
    elif request.method in ("reflow", "dmd"):
        pair_g = request.pair_guidance if request.pair_guidance is not None else tcfg.sample_guidance
        dataset = reflow_pairs(root, ref.id, tcfg, request.pairs, request.pair_steps, request.pair_sampler,
                               float(pair_g), request.seed, threads=request.threads)
        pairs_seconds = float(get_dataset(root, dataset).card.get("seconds") or 0.0)
        if request.method == "reflow":
            extra_for = lambda n: {"default_steps": n, "t_sampling": "uniform"}  # noqa: E731
        else:
            extra_for = lambda n: {"real_guidance": request.guidance(  # noqa: E731
                tcfg.model.get("conditioning", "none") != "none", tcfg.sample_guidance)[0],
                "regression_weight": request.regression_weight}
    elif request.method == "ict":
        extra_for = lambda n: {"curriculum_steps": request.steps, "distance": request.distance,  # noqa: E731
                               "sample_steps": n}
    else:
        extra_for = lambda n: {"levels": request.levels, "target_ema": request.target_ema,  # noqa: E731
                               "distance": request.distance, "teacher_guidance": request.teacher_guidance,
                               "sample_steps": n}
    for n in request.rounds():
        label = f"{request.method} round {len(rounds) + 1} ({n} steps)"
        treq = student_request(request, teacher_id, tcfg, dataset, extra_for(n), label)
        summary = train_run(treq, root, progress=progress)
        rounds.append({"steps": n, "run_id": summary["run_id"], "checkpoint": summary["checkpoint"],
                       "reused": summary["reused"], "last_losses": summary["last_losses"],
                       "seconds": summary.get("seconds")})
        teacher_id = summary["run_id"]
    from models.checkpoint import load_family

    student = rounds[-1]
    cost = distill_cost(request, tcfg, rounds, pairs_seconds)
    # the report is an artifact like any other: named by what it depends on, computed once (the
    # cost's seconds are a record of the runs, not an input)
    inputs = {"teacher_checkpoint": str(ref.checkpoint), "student_checkpoint": str(student["checkpoint"]),
              "nfe": list(request.report_nfe), "count": request.report_count, "seed": request.seed,
              "teacher_steps": REPORT_TEACHER_STEPS, "threads": request.threads,
              "code": code_version(_code_self(), distill_config, __import__("models.samplers", fromlist=["x"]))}
    report_dir = Path(get_run(root, student["run_id"]).path) / "distill_report" / stable_hash(inputs)
    reused = is_complete(report_dir)
    if not reused:
        with stage_output(report_dir) as (tmp, card):
            t_g, s_g = request.guidance(tcfg.model.get("conditioning", "none") != "none", tcfg.sample_guidance)
            models = [("teacher", load_family(ref.checkpoint), t_g)]
            models += [(f"student_{r['steps']}", load_family(r["checkpoint"]), s_g) for r in rounds[-1:]]
            label = f"student_{rounds[-1]['steps']}"
            teacher_cost = {"student_steps": int(tcfg.steps),
                            "train_seconds": float((ref.card.get("summary") or {}).get("seconds") or 0.0)}
            nfe_report(models, tmp, tcfg, request.report_nfe, request.report_count, request.seed,
                       REPORT_TEACHER_STEPS, cost={"teacher": teacher_cost, label: cost}, threads=request.threads)
            card.update(inputs)
    report = {**read_nfe_report(report_dir), "reused": reused}
    return {"method": request.method, "teacher_run": ref.id, "dataset_id": dataset, "rounds": rounds,
            "student_run": student["run_id"], "student_checkpoint": student["checkpoint"], "report": report,
            "cost": cost, "seconds": round(time.time() - t0, 3)}


# ------------------------------------------------------------------------------------------ lcm_lora


class _WithOptions:
    """A family whose samples always take these sampler options (an NFE-report row)."""

    def __init__(self, family: Any, **options: Any) -> None:
        self.family, self.options = family, options
        self.default_sampler, self.noise_shape = family.default_sampler, family.noise_shape

    def sample_result(self, *args: Any, **kw: Any) -> Any:
        return self.family.sample_result(*args, **{**kw, **self.options})


def lcm_student_request(request: DistillRequest, identity: dict[str, Any]) -> TrainRequest:
    """The lcm_lora student's TrainRequest: the pipeline, LoRA and distillation settings of the request."""
    from models.hf_diffusers import default_resolution

    model: dict[str, Any] = {
        "pipeline": request.teacher, "image_size": request.image_size or default_resolution(Path(identity["path"])),
        "rank": request.lora_rank, "ddim_steps": request.ddim_steps, "guidance_min": request.teacher_guidance,
        "guidance_max": request.teacher_guidance_max if request.teacher_guidance_max is not None
        else request.teacher_guidance, "guidance_embedding": request.guidance_embedding, "target": request.target,
        "target_ema": request.target_ema, "distance": request.distance, "sample_steps": request.student_steps}
    if request.lora_targets:
        model["targets"] = list(request.lora_targets)
    train = {"family": "lcm_lora", "model": model, "steps": request.steps, "batch_size": request.batch_size or 8,
             "lr": request.lr or 1e-4, "ema_decay": request.ema_decay or 0.0, "warmup_steps": request.warmup_steps,
             "ckpt_every": min(1000, request.steps), "seed": request.seed, "sample_count": 4}
    try:
        return TrainRequest(dataset=str(request.dataset), train=TrainConfig(**train), nproc=request.nproc)
    except ValueError as exc:
        raise RunError(f"lcm_lora: the student config is invalid: {exc}") from exc


def distill_lcm_lora(request: DistillRequest, root: Path,
                     progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """LCM-LoRA (models/lcm_lora.py): one student run on ``request.dataset`` with the diffusers
    pipeline as teacher, the adapter exported alone (``<run>/adapter/``), and the NFE report: the
    teacher with its own scheduler at 50 steps as the reference and at each NFE, the student with
    the deterministic LCM sampler (``student``: gamma 0, stays on the noise's trajectory, so its MSE
    to the teacher on the same noise measures the distillation) and with LCM's own fresh-noise
    re-noising (``student_lcm``: gamma 1, what LCMScheduler does)."""
    from models.checkpoint import load_family
    from models.hf_diffusers import DiffusersModel
    from models.lcm_lora import export_adapter

    identity, _ = _lcm_teacher(root, request.teacher)
    t0 = time.time()
    treq = lcm_student_request(request, identity)
    summary = train_run(treq, root, progress=progress)
    rounds = [{"steps": request.student_steps, "run_id": summary["run_id"], "checkpoint": summary["checkpoint"],
               "reused": summary["reused"], "last_losses": summary["last_losses"], "seconds": summary.get("seconds")}]
    run = get_run(root, summary["run_id"])
    scfg = TrainConfig(**run.card["config"])
    adapter_dir = Path(run.path) / "adapter"
    if not is_complete(adapter_dir):
        with stage_output(adapter_dir) as (tmp, card):
            export_adapter(summary["checkpoint"], tmp)
            card.update(checkpoint=str(summary["checkpoint"]), base=request.teacher,
                        base_files_sha256=stable_hash(identity["files"]))
    cost = distill_cost(request, scfg, rounds)
    inputs = {"teacher": request.teacher, "teacher_files": stable_hash(identity["files"]),
              "student_checkpoint": str(summary["checkpoint"]), "nfe": list(request.report_nfe),
              "count": request.report_count, "seed": request.seed, "teacher_steps": REPORT_TEACHER_STEPS,
              "guidance": request.teacher_guidance,
              "code": code_version(_code_self(), distill_config, __import__("models.lcm_lora", fromlist=["x"]))}
    report_dir = Path(run.path) / "distill_report" / stable_hash(inputs)
    reused = is_complete(report_dir)
    if not reused:
        with stage_output(report_dir) as (tmp, card):
            student = load_family(summary["checkpoint"])
            teacher = DiffusersModel(request.teacher, resolution=int(scfg.model["image_size"]))
            s_g = request.teacher_guidance if student.cfg.guidance_embedding else 1.0
            models = [("teacher", teacher, request.teacher_guidance), ("student", _WithOptions(student, gamma=0.0), s_g),
                      ("student_lcm", _WithOptions(student, gamma=1.0), s_g)]
            nfe_report(models, tmp, scfg, request.report_nfe, request.report_count, request.seed,
                       REPORT_TEACHER_STEPS, cost={"student": cost, "student_lcm": cost})
            card.update(inputs)
    report = {**read_nfe_report(report_dir), "reused": reused}
    return {"method": request.method, "teacher_run": request.teacher, "teacher_identity":
            {k: identity[k] for k in ("model", "source", "revision", "pipeline")} | {"files_sha256": inputs["teacher_files"]},
            "dataset_id": summary["dataset_id"], "rounds": rounds, "student_run": summary["run_id"],
            "student_checkpoint": summary["checkpoint"], "adapter": str(adapter_dir / "pytorch_lora_weights.safetensors"),
            "report": report, "cost": cost, "seconds": round(time.time() - t0, 3)}
