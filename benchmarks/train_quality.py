"""Train every family at the same fixed CPU budget on the embedded world, evaluate it, leaderboard.

Budget: each family gets the same number of CPU-seconds of training (``--budget-cpu-s``; the
training process's CPU time, torch on ``--threads`` threads, data decoded in-process with
``num_workers=0`` so decoding is counted).  A short probe of each family (its own network, batch
and data, outside the registry) measures CPU-seconds per step; the run then trains
``budget / (CPU-s per step)`` steps, so cheap steps (GAN, VAE) get more of them.  Measuring CPU
time rather than wall time keeps the budget the same when other jobs share the machine.  Pass
``--steps-for family=N`` to repeat an earlier table exactly (the JSON line lists the steps).

Families: the diffusion/flow families (ddpm, edm, flow, ict = consistency training) on the
preset's network; vae, gan, kl_autoencoder, vq, vqgan, vq_lfq (vq with LFQ) and msvq (VAR's
multi-scale tokenizer) with their own CPU-sized networks; latent_flow (a tiny DiT flow on the
latents of the kl_autoencoder run), latent_mmdit (the same with the MMDiT backbone),
latent_flow_repa (latent_flow with REPA on the world's reference CLIP), maskgit and ar (on the
tokens of the vq run) and var (on the token maps of the msvq run), whose first stage is that
family's row (its budget is not charged twice; the table says so); dmd, distilled from the flow
row's run on 512 of its (noise, 20-step Euler sample) pairs (drawing the pairs is not charged
either; the JSON names the teacher).  Every run is
evaluated with the same settings (FD on the reference CLIP, KID, CLIPScore for conditional ones)
and a leaderboard is written.  The runs land in the run registry (``<data root>/runs/<id>``), so
reruns reuse finished runs.

    .venv/bin/python benchmarks/train_quality.py [--preset smoke] [--budgets 100,600]
        [--families ddpm,edm,flow,...] [--data-root DIR] [--curate] [--write-readme]

Several budgets (``--budgets``) give one column group each: every family trains once per budget
(a latent or token row on its first stage's run at the same budget, DMD from the flow row at
the same budget).  Text-conditioned rows are also scored with GenEval-world (``--geneval-per-prompt``
images per prompt; every task in the JSON, overall in the table).

Prints one row per (family, budget) (steps, CPU-s, wall s, final losses, metrics), the markdown
table, and one line of JSON.  ``--write-readme`` replaces the block between ``README_BEGIN`` and
``README_END`` in README.md with the table (the README's leaderboard is written only this way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.paths import data_root  # noqa: E402
from imagegen.presets import build_config  # noqa: E402
from imagegen.registry import RegistryError, get_dataset  # noqa: E402
from imagegen.evaluate.run import evaluate  # noqa: E402
from imagegen.latents import encode_dataset  # noqa: E402
from imagegen.leaderboard import leaderboard, write_leaderboard  # noqa: E402
from imagegen.distill import reflow_pairs  # noqa: E402
from imagegen.train.runs import TRAIN_PRESETS, TrainRequest, get_run, prepare, train_run  # noqa: E402
from imagegen.train.trainer import TrainConfig, train  # noqa: E402

# Families that are not denoisers bring their own network settings (small, CPU-sized).
OWN_MODEL: dict[str, dict] = {
    "vae": {"width": 32, "latent_channels": 4, "levels": 2},
    "gan": {"width": 32, "latent_dim": 64, "levels": 2},
    "kl_autoencoder": {"width": 32, "latent_channels": 4, "levels": 2},
    "vq": {"width": 32, "codebook_size": 256, "code_dim": 8, "levels": 2},
    "vqgan": {"width": 32, "codebook_size": 256, "code_dim": 8, "levels": 2},
    "vq_lfq": {"width": 32, "quantizer": "lfq", "lfq_bits": 8, "levels": 2},
    "msvq": {"width": 32, "codebook_size": 256, "code_dim": 8, "levels": 2},
}
# Leaderboard rows that are a registered family with other settings.
ROW_FAMILY = {"vq_lfq": "vq", "latent_flow": "flow", "latent_mmdit": "flow", "latent_flow_repa": "flow"}
# Rows distilled from another row's run (their teacher; the pairs dataset is drawn from it, not charged).
TEACHER = {"dmd": "flow"}
DMD_PAIRS, DMD_PAIR_STEPS = 512, 20


def msvq_scales(side: int) -> list[int]:
    """VAR-style scales for a latent side: 1, 2, 3, 4, 6, 8, ... below it, then the side itself."""
    return [s for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48) if s < side] + [side]


def ensure_dataset(root: Path, name: str, curate: bool) -> None:
    try:
        get_dataset(root, name)
    except RegistryError:
        if not curate:
            raise SystemExit(f"dataset {name!r} is not in the registry at {root}; run `imagegen curate --preset "
                             f"{name.removeprefix('world-')} --data-root {root}` first, or pass --curate")
        from imagegen.curate import CurateConfig, curate
        from imagegen.presets import CURATE_PRESETS

        preset = name.removeprefix("world-")
        curate(build_config(CurateConfig, CURATE_PRESETS, preset), root)


FIRST_STAGE = {"latent_flow": "kl_autoencoder", "latent_mmdit": "kl_autoencoder",
               "latent_flow_repa": "kl_autoencoder", "maskgit": "vq", "ar": "vq", "var": "msvq"}
DEFAULT_FAMILIES = ("ddpm,edm,flow,vae,gan,kl_autoencoder,latent_flow,vq,maskgit,vqgan,vq_lfq,ar,msvq,var,"
                    "latent_mmdit,latent_flow_repa,ict,dmd")


def family_request(base: TrainRequest, family: str, dataset: str | None = None, teacher: str | None = None) -> dict:
    """The preset's request with ``family`` swapped in (and, for latent families, ``dataset``; for a
    distilled row, the teacher run and its pairs ``dataset``)."""
    data = base.model_dump(mode="json")
    data["train"].update(family=ROW_FAMILY.get(family, family), num_workers=0)
    size = data["train"]["model"].get("image_size", 32)
    cond = data["train"]["model"].get("conditioning", "none")
    if family in OWN_MODEL:  # not a denoiser: its own network settings, same budget and data
        data["train"]["model"] = {"image_size": size, **OWN_MODEL[family]}
        if family == "msvq":
            data["train"]["model"]["scales"] = msvq_scales(size // 4)
        for k in ("label_keywords", "label_field", "classes", "sample_prompts"):
            data["train"].pop(k, None)
        data["train"]["sample_guidance"] = 1.0
        data["train"]["sample_steps"] = None
    if family in FIRST_STAGE:
        data["dataset"] = dataset
        model = {"conditioning": cond, **({"text_encoder": data["train"]["model"]["text_encoder"]}
                                          if cond == "text" else {})}
        if family in ("latent_flow", "latent_mmdit", "latent_flow_repa"):
            model.update(data="latents", net="mmdit" if family == "latent_mmdit" else "dit", net_size="tiny",
                         net_overrides={"patch_size": 2})
            if family == "latent_flow_repa":  # the world's reference CLIP as the aligned encoder
                model["repa"] = {"encoder": "world", "layer": 1, "projector_dim": 256}
        else:
            model.update(hidden=128, depth=4, heads=4)
            if family in ("ar", "var"):
                data["train"]["sample_steps"] = None  # one step per token / per scale
        data["train"]["model"] = model
    if family in TEACHER:  # a student of the teacher row's run, on its (noise, sample) pairs
        data["dataset"] = dataset
        model = {**data["train"]["model"], "teacher": f"run:{teacher}"}
        if cond != "none":
            model["real_guidance"] = data["train"].get("sample_guidance", 1.0)
        data["train"]["model"] = model
        data["train"].update(sample_steps=1, sample_guidance=1.0)
    # keep only the model fields the new family accepts (the preset's own family may have others)
    from models.registry import get_family

    fields = get_family(data["train"]["family"]).Config.model_fields
    data["train"]["model"] = {k: v for k, v in data["train"]["model"].items() if k in fields}
    return data


class _ProbeDone(Exception):
    pass


def cpu_per_step(data: dict, root: Path, probe_cpu_s: float) -> float:
    """CPU-seconds per training step of this request, measured over ``probe_cpu_s`` of training
    after the first progress report (start-up and the first steps excluded)."""
    probe = dict(data, train={**data["train"], "steps": 10**6, "sample_every": 0, "ckpt_every": 10**6})
    prep = prepare(TrainRequest(**probe), root)
    marks: list[tuple[int, float]] = []

    def progress(info: dict) -> None:
        marks.append((int(info["step"]), time.process_time()))
        if len(marks) >= 2 and marks[-1][1] - marks[0][1] >= probe_cpu_s and marks[-1][0] > marks[0][0]:
            raise _ProbeDone

    with tempfile.TemporaryDirectory(prefix="quality-probe-") as tmp:
        try:
            train(prep.resolved, prep.dataset.shards, tmp, progress=progress)
        except _ProbeDone:
            pass
    (s0, c0), (s1, c1) = marks[0], marks[-1]
    return (c1 - c0) / (s1 - s0)


README_BEGIN = "<!-- train_quality:begin -->"
README_END = "<!-- train_quality:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def parse_budgets(text: str) -> list[float]:
    """``"100,600"`` -> [100.0, 600.0]: positive CPU-second budgets, each once, in the order given."""
    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--budgets: {part!r} is not a number of CPU-seconds (e.g. --budgets 100,600)") from None
        if not value > 0:
            raise ValueError(f"--budgets: {part} must be > 0 CPU-seconds")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("--budgets names no budget (e.g. --budgets 100,600)")
    return out


def parse_steps_for(items: list[str]) -> dict[tuple[str, float | None], int]:
    """``FAMILY=N`` (every budget) or ``FAMILY@BUDGET=N`` (that budget's column) -> steps."""
    out: dict[tuple[str, float | None], int] = {}
    for item in items:
        key, sep, n = item.partition("=")
        family, _, budget = key.partition("@")
        if not sep or not family or not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"--steps-for {item!r}: expected FAMILY=N or FAMILY@BUDGET=N with N >= 1")
        out[(family.strip(), float(budget) if budget else None)] = int(n)
    return out


def _budget_label(budget: float) -> str:
    return f"{budget:g}"


def _metric(metrics: dict, *prefixes: str) -> float | None:
    for name, value in metrics.items():
        if name.startswith(prefixes):
            return value
    return None


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown_table(rows: list[dict], budgets: list[float]) -> str:
    """One line per family, one column group per budget (steps, FD, KID ×10³, CLIPScore, GenEval
    overall), ordered by FD at the largest budget (rows without one last)."""
    by: dict[str, dict[float, dict]] = {}
    for r in rows:
        by.setdefault(r["family"], {})[r["budget_cpu_s"]] = r
    last = budgets[-1]

    def order(family: str) -> tuple[float, str]:
        fd = _metric(by[family].get(last, {}).get("metrics", {}), "FD")
        return (fd if fd is not None else float("inf"), family)

    head = ["family", "sampler, NFE"]
    for b in budgets:
        label = _budget_label(b)
        head += [f"steps @{label}", f"FD ↓ @{label}", f"KID ×10³ ↓ @{label}", f"CLIPScore @{label}",
                 f"GenEval ↑ @{label}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (5 * len(budgets))) + "|"]
    for family in sorted(by, key=order):
        any_row = next(iter(by[family].values()))
        cells = [family + (f" (on {any_row['first_stage_family']})" if any_row.get("first_stage_family") else ""),
                 f"{any_row.get('sampler') or '–'}, {any_row.get('nfe') if any_row.get('nfe') is not None else '–'}"]
        for b in budgets:
            r = by[family].get(b)
            if r is None:
                cells += ["–"] * 5
                continue
            m = r["metrics"]
            kid = _metric(m, "KID", "KD-")  # KID on Inception, KD-<extractor> on another
            cells += [str(r["steps"]), _cell(_metric(m, "FD"), ",.0f"), _cell(None if kid is None else kid * 1e3, ",.1f"),
                      _cell(_metric(m, "CLIPScore"), ".2f"), _cell(m.get("GenEval overall"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_block(table: str, meta: dict) -> str:
    """The README's generated block: how the table was made, then the table."""
    budgets = ", ".join(_budget_label(b) for b in meta["budgets"])
    return (f"{README_BEGIN}\n"
            f"Written by `benchmarks/train_quality.py --write-readme` (do not edit by hand): preset "
            f"`{meta['preset']}`, budgets {budgets} training CPU-s per family ({meta['threads']} torch thread"
            f"{'s' if meta['threads'] != 1 else ''}), {meta['n_eval']} images per row for FD/KID/CLIPScore "
            f"(reference CLIP), GenEval-world at {meta['geneval_per_prompt']} image(s) per prompt for "
            f"text-conditioned rows; {meta['date']}, {meta['cpus']} CPUs, load average "
            f"{meta['load_average'][0]:.1f} at the end. Families: {', '.join(meta['families'])}.\n\n"
            f"{table}\n{README_END}")


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with everything from README_BEGIN to README_END (inclusive) replaced by ``block``;
    a README without exactly one ordered pair of markers is refused."""
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"README needs exactly one {README_BEGIN} ... {README_END} block "
                         f"(found {text.count(README_BEGIN)} begin, {text.count(README_END)} end markers)")
    start, end = text.index(README_BEGIN), text.index(README_END)
    if end < start:
        raise ValueError(f"README: {README_END} comes before {README_BEGIN}")
    return text[:start] + block + text[end + len(README_END):]


def write_readme(path: Path, block: str) -> None:
    text = path.read_text()
    new = replace_readme_block(text, block)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smoke", choices=sorted(TRAIN_PRESETS))
    ap.add_argument("--budgets", default=None, metavar="B1,B2",
                    help="training CPU-seconds per family, one column group each (default: --budget-cpu-s)")
    ap.add_argument("--budget-cpu-s", type=float, default=180.0, help="one budget (when --budgets is not given)")
    ap.add_argument("--probe-cpu-s", type=float, default=8.0, help="CPU-seconds of each family's speed probe")
    ap.add_argument("--steps-for", action="append", default=[], metavar="FAMILY[@BUDGET]=N",
                    help="train FAMILY for N steps instead of the budget's (to repeat a table)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--families", default=DEFAULT_FAMILIES)
    ap.add_argument("--n-eval", type=int, default=500, help="images generated per family for the metrics")
    ap.add_argument("--geneval-per-prompt", type=int, default=1, help="GenEval-world images per prompt "
                    "(text-conditioned rows)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more request overrides")
    ap.add_argument("--curate", action="store_true", help="curate the preset's dataset if it is missing")
    ap.add_argument("--write-readme", nargs="?", const=str(README), default=None, metavar="README",
                    help=f"replace the {README_BEGIN} block of README.md (or this file) with the table")
    args = ap.parse_args()
    try:
        budgets = parse_budgets(args.budgets) if args.budgets else parse_budgets(str(args.budget_cpu_s))
        fixed = parse_steps_for(args.steps_for)
        if args.write_readme:
            replace_readme_block(Path(args.write_readme).read_text(), "")  # refuse before any training
    except (ValueError, OSError) as exc:
        raise SystemExit(f"train_quality: {exc}") from None
    torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()]

    root = data_root(args.data_root)
    base = build_config(TrainRequest, TRAIN_PRESETS, args.preset, list(args.set))
    ensure_dataset(root, base.dataset, args.curate)
    rows: list[dict] = []
    evals: dict[float, list[dict]] = {b: [] for b in budgets}
    runs: dict[tuple[str, float], str] = {}  # (family, budget) -> run id
    latent_sets: dict[tuple[str, float], str] = {}

    def run_family(family: str, budget: float) -> dict:
        dataset = teacher = None
        if family in FIRST_STAGE:
            first = FIRST_STAGE[family]
            if (first, budget) not in runs:
                run_family(first, budget)
            if (first, budget) not in latent_sets:
                latent_sets[(first, budget)] = encode_dataset(root, base.dataset, runs[(first, budget)])
            dataset = latent_sets[(first, budget)]
        if family in TEACHER:
            if (TEACHER[family], budget) not in runs:
                run_family(TEACHER[family], budget)
            teacher = runs[(TEACHER[family], budget)]
            tcfg = TrainConfig(**get_run(root, teacher).card["config"])
            guidance = tcfg.sample_guidance if tcfg.model.get("conditioning", "none") != "none" else 1.0
            dataset = reflow_pairs(root, teacher, tcfg, DMD_PAIRS, DMD_PAIR_STEPS, "euler", guidance, seed=0)
        data = family_request(base, family, dataset, teacher)
        pinned = fixed.get((family, budget), fixed.get((family, None)))
        per_step = None if pinned is not None else cpu_per_step(data, root, args.probe_cpu_s)
        steps = pinned if per_step is None else max(1, round(budget / per_step))
        data["train"]["steps"] = steps
        if data["train"]["family"] == "ict":  # the discretisation curriculum spans the run
            data["train"]["model"]["curriculum_steps"] = steps
        if data["train"]["family"] == "vqgan":  # the discriminator joins after the first quarter
            data["train"]["model"]["disc_start"] = steps // 4
        data["train"]["warmup_steps"] = min(data["train"].get("warmup_steps", 0), max(1, steps // 10))
        data["train"]["ckpt_every"] = steps
        req = TrainRequest(**data)
        t0, c0 = time.perf_counter(), time.process_time()
        res = train_run(req, root)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs[(family, budget)] = res["run_id"]
        cond = req.train.model.get("conditioning", "none") if isinstance(req.train.model, dict) else "none"
        metrics = ["fid", "kid", "clipscore", "geneval"] if cond == "text" else (
            ["fid", "kid", "clipscore"] if cond not in (None, "none") else ["fid", "kid"])
        ev = evaluate({"run": res["run_id"], "reference": base.dataset, "n_samples": args.n_eval, "metrics": metrics,
                       "geneval_per_prompt": args.geneval_per_prompt}, root)
        evals[budget].append(ev)
        row = {"family": family, "budget_cpu_s": budget, "run_id": res["run_id"], "reused": res["reused"],
               "steps": res["step"], "probe_cpu_s_per_step": round(per_step, 4) if per_step else None,
               "train_cpu_s": round(cpu, 1), "train_wall_s": round(wall, 1),
               "first_stage": runs.get((FIRST_STAGE.get(family, ""), budget)),
               "first_stage_family": FIRST_STAGE.get(family), "teacher": teacher,
               "sampler": ev.get("sampler"), "nfe": ev.get("nfe"), "final_losses": res["last_losses"],
               "grid": res["samples"][-1] if res.get("samples") else None, "checkpoint": res["checkpoint"],
               "metrics": ev["metrics"]}
        rows.append(row)
        print(f"{family:14s} @{_budget_label(budget):>5s} {row['steps']:6d} steps  {row['train_cpu_s']:7.1f} CPU-s "
              f"{row['train_wall_s']:7.1f} s  run {row['run_id']}{' (reused)' if row['reused'] else ''}  "
              f"{ev['metrics']}", flush=True)
        return row

    for budget in budgets:
        for family in families:
            if (family, budget) not in runs:
                run_family(family, budget)
    boards = {_budget_label(b): write_leaderboard(leaderboard(root, evals[b]), Path(root) / "leaderboards"
                                                 / f"quality-{args.preset}-{_budget_label(b)}cpus")
              for b in budgets}
    table = markdown_table(rows, budgets)
    print(table)
    meta = {"preset": args.preset, "budgets": budgets, "threads": args.threads, "n_eval": args.n_eval,
            "geneval_per_prompt": args.geneval_per_prompt, "families": families,
            "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    if args.write_readme:
        write_readme(Path(args.write_readme), readme_block(table, meta))
        print(f"README block written: {args.write_readme}")
    print(f"leaderboards: {boards}")
    print(json.dumps({**meta, "runs": rows, "leaderboards": boards, "table": table,
                      "steps_for": [f"{r['family']}@{_budget_label(r['budget_cpu_s'])}={r['steps']}" for r in rows]},
                     default=str))


if __name__ == "__main__":
    main()
