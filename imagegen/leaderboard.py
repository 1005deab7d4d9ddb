"""Leaderboards: many evaluations side by side, as plain functions (``flows/benchmark.py`` wraps them).

* :func:`select_runs` - the registry query: run ids by family, status and dataset;
* :func:`leaderboard` - one row per evaluation (run, sampler, steps): the run's family, teacher
  (students name theirs as ``model.teacher = "run:<id>"``), dataset and trained steps, the
  sampling settings and NFE, and one column per metric;
* :func:`write_leaderboard` - ``leaderboard.parquet``, ``leaderboard.md`` and two PNG plots: the
  main metric per family (the best evaluation of each), and the main metric against NFE with one
  panel per teacher holding its line and its students' lines;
* :func:`build_leaderboard` - all of that under ``<root>/leaderboards/<id>/`` with a ``card.json``.

The main metric is the first of FID, FD-<extractor>, GenEval overall, CLIPScore (Hessel), KID that
the evaluations have; distances are better lower, scores (CLIPScore, GenEval) higher.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from imagegen.artifacts import write_json_atomic
from imagegen.hashing import code_version, stable_hash

if TYPE_CHECKING:  # the evaluation module imports torch
    from imagegen.evaluate.request import EvalSummary

LEADERBOARDS = "leaderboards"
ID_COLUMNS = ["run_id", "model", "model_revision", "model_files_sha256", "family", "teacher_run", "lineage", "dataset", "dataset_id", "trained_steps", "sampler",
              "steps", "nfe", "guidance", "n_samples", "eval_id"]
MODEL_COLUMNS = ("model", "model_revision", "model_files_sha256")
INT_COLUMNS = ("trained_steps", "steps", "nfe", "n_samples")
FILES = {"parquet": "leaderboard.parquet", "markdown": "leaderboard.md", "family_plot": "metric_per_family.png",
         "nfe_plot": "metric_vs_nfe.png"}


def leaderboards_dir(root: Path | str) -> Path:
    return Path(root) / LEADERBOARDS


# ------------------------------------------------------------------------------------------ runs


def teacher_of(card: dict[str, Any]) -> str | None:
    """The teacher run id of a distilled student (its config's ``model.teacher = "run:<id>"``), else None."""
    teacher = ((card.get("config") or {}).get("model") or {}).get("teacher")
    return teacher[len("run:"):] if isinstance(teacher, str) and teacher.startswith("run:") else None


def lineage(run_id: str, cards: dict[str, dict[str, Any]]) -> list[str]:
    """``run_id``, its teacher, the teacher's teacher ... (progressive rounds chain students); stops at
    a run without a teacher, or one not in ``cards``."""
    chain = [run_id]
    while chain[-1] in cards:
        teacher = teacher_of(cards[chain[-1]])
        if teacher is None or teacher in chain:
            break
        chain.append(teacher)
    return chain


def select_runs(root: Path | str, families: list[str] | None = None, status: str | None = "finished",
                dataset: str | None = None) -> list[str]:
    """Ids of the runs under ``root`` (oldest first) with ``status`` (None: any), a family in ``families``
    (None: any) and trained on ``dataset`` (name or id; None: any).  A distilled student counts as
    trained on its teacher's dataset too (a reflow student trains on the teacher's pairs dataset).

    An unknown family name or dataset is an error (ValueError / LookupError), not an empty list."""
    from imagegen.registry import get_dataset
    from imagegen.train.runs import list_runs
    from models.registry import FAMILIES

    refs = list_runs(root)
    if families:
        known = set(FAMILIES) | {r.card.get("family") for r in refs}
        unknown = [f for f in families if f not in known]
        if unknown:
            raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; registered families: "
                             f"{sorted(FAMILIES)}; families of runs under {Path(root) / 'runs'}: "
                             f"{sorted({str(r.card.get('family')) for r in refs})}")
    dataset_id = get_dataset(Path(root), dataset).id if dataset else None
    cards = {r.id: r.card for r in refs}
    out = []
    for r in refs:
        if status is not None and r.card.get("status") != status:
            continue
        if families and r.card.get("family") not in families:
            continue
        if dataset_id is not None and dataset_id not in {cards[i].get("dataset_id") for i in lineage(r.id, cards)
                                                          if i in cards}:
            continue
        out.append(r.id)
    return out


# ------------------------------------------------------------------------------------------ table


def lower_is_better(metric: str) -> bool:
    """The direction of a result column, from the metric table (imagegen/evaluate/metrics.py)."""
    from imagegen.evaluate.metrics import higher_is_better

    return not higher_is_better(metric)


def main_metric(columns: list[str]) -> str | None:
    """The metric a leaderboard ranks by: FID, else FD-<extractor>, else GenEval overall, else
    CLIPScore (Hessel), else KID / KD-<extractor>, else the control benchmark's ControlNet mean IoU,
    else its inpainting GenEval; None when there is none of them."""
    tests = (lambda c: c == "FID", lambda c: c.startswith("FD-"), lambda c: c == "GenEval overall",
             lambda c: c.startswith("CLIPScore (Hessel"), lambda c: c == "KID" or c.startswith("KD-"),
             lambda c: c == "Control mean IoU", lambda c: c == "Control inpaint GenEval")
    for test in tests:
        hits = [c for c in columns if test(c)]
        if hits:
            return hits[0]
    return None


CI_LOW, CI_HIGH = " ci_low", " ci_high"  # suffixes of a metric's interval columns
WITHIN = "within_ci_of_above"  # the main metric's difference to the row ranked above is within the intervals


def metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ID_COLUMNS and c != WITHIN and not c.endswith((CI_LOW, CI_HIGH))]


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return not (a[1] < b[0] or b[1] < a[0])


def mark_within_intervals(df: pd.DataFrame, metric: str) -> pd.Series:
    """True where the row's ``metric`` interval overlaps the interval of the row ranked just above
    it (the difference is within the uncertainty: the order of the two is not established); None
    where either row has no interval."""
    lo, hi = df.get(metric + CI_LOW), df.get(metric + CI_HIGH)
    out: list[Any] = [None] * len(df)
    if lo is None or hi is None:
        return pd.Series(out, index=df.index, dtype=object)
    for i in range(1, len(df)):
        a = (lo.iloc[i - 1], hi.iloc[i - 1])
        b = (lo.iloc[i], hi.iloc[i])
        if any(pd.isna(v) for v in (*a, *b)):
            continue
        out[i] = _overlap((float(a[0]), float(a[1])), (float(b[0]), float(b[1])))
    return pd.Series(out, index=df.index, dtype=object)


def leaderboard(root: Path | str, eval_summaries: list[EvalSummary]) -> pd.DataFrame:
    """One row per evaluation summary (as :func:`imagegen.evaluate.run.evaluate` returns them), best
    first by the main metric; the same (run, sampler, steps, guidance) twice keeps the first.

    Columns: run_id, model / model_revision / model_files_sha256 (a diffusers model's spec, revision and
    the hash of its files' sha256 list), family, teacher_run (None unless a distilled student), lineage (the first
    teacher of the chain, or the run itself: the NFE plot's panel), dataset (name), dataset_id,
    trained_steps, sampler, steps, nfe, guidance, n_samples, eval_id, then one column per metric."""
    from imagegen.train.runs import get_run, list_runs

    cards = {r.id: r.card for r in list_runs(root)}
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for s in eval_summaries:
        run_id = s.get("run_id")
        card = (cards.get(run_id) or get_run(root, run_id).card) if run_id else {}
        model = s.get("model") or {}
        key = (run_id or s.get("path"), s.get("sampler"), s.get("steps"), s.get("guidance"))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"run_id": run_id, "model": model.get("spec"), "model_revision": model.get("revision"),
                     "model_files_sha256": model.get("files_sha256"),
                     "family": s.get("family") or card.get("family") or "(folder)",
                     "teacher_run": teacher_of(card), "lineage": lineage(run_id, cards)[-1] if run_id else None,
                     "dataset": card.get("dataset_name"), "dataset_id": card.get("dataset_id"),
                     "trained_steps": (card.get("summary") or {}).get("step"), "sampler": s.get("sampler"),
                     "steps": s.get("steps"), "nfe": s.get("nfe"), "guidance": s.get("guidance"),
                     "n_samples": s.get("n_samples"), "eval_id": s.get("eval_id"), **s.get("metrics", {}),
                     **{f"{m}{CI_LOW}": iv[0] for m, iv in (s.get("intervals") or {}).items()},
                     **{f"{m}{CI_HIGH}": iv[1] for m, iv in (s.get("intervals") or {}).items()}})
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(ID_COLUMNS + [k for r in rows for k in r])))
    for col in INT_COLUMNS:
        df[col] = pd.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                            for v in df[col]], dtype="Int64")
    metrics = metric_columns(df)
    cis = [c for c in df.columns if c.endswith((CI_LOW, CI_HIGH))]
    for col in metrics + cis:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    main = main_metric(metrics)
    order = [main] if main else []
    ordered = order + [c for c in metrics if c != main]
    ci_cols = [c + suffix for c in ordered for suffix in (CI_LOW, CI_HIGH) if c + suffix in df.columns]
    df = df[ID_COLUMNS + ordered + ci_cols]
    by = order + ["run_id", "nfe"]
    ascending = [lower_is_better(main)] if main else []
    df = df.sort_values(by, ascending=ascending + [True, True], na_position="last", kind="stable") \
           .reset_index(drop=True)
    df[WITHIN] = mark_within_intervals(df, main) if main else pd.Series([None] * len(df), dtype=object)
    return df


# ------------------------------------------------------------------------------------------ outputs


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _metric_cell(row: Any, col: str, df: pd.DataFrame) -> str:
    """``value [low, high]`` when the column has an interval."""
    text = _cell(row[col])
    lo, hi = col + CI_LOW, col + CI_HIGH
    if lo in df.columns and hi in df.columns and not (pd.isna(row[lo]) or pd.isna(row[hi])):
        text += f" [{row[lo]:.4g}, {row[hi]:.4g}]"
    return text


def protocol_lines(protocol: dict[str, Any] | None) -> list[str]:
    """The protocol card as markdown lines (what every row shares; what is mixed)."""
    if not protocol:
        return []
    lines = ["## Protocol", "", f"- samples per evaluation: {protocol.get('n_samples')}; seeds: "
             f"{protocol.get('seeds')} ({protocol.get('n_seeds')} per evaluation); reference: "
             f"{protocol.get('reference')}; clean-fid resize mode: {protocol.get('fid_mode')}; intervals: "
             f"{protocol.get('confidence')} with {protocol.get('n_resamples')} bootstrap resamples"]
    for m, fields in (protocol.get("metrics") or {}).items():
        keep = {k: v for k, v in fields.items() if k in ("extractor", "extractor_weights_sha256", "mode",
                                                         "reference_stats_sha256", "clip_sha256", "model_sha256",
                                                         "detector", "prompt_set")}
        if keep:
            lines.append(f"- {m}: " + ", ".join(f"{k} `{str(v)[:16]}`" for k, v in keep.items()))
    if protocol.get("mixed"):
        lines.append("- **not one protocol**: " + "; ".join(protocol["mixed"]))
    return lines + [""]


def leaderboard_markdown(df: pd.DataFrame, images: dict[str, str] | None = None, title: str = "Leaderboard",
                         protocol: dict[str, Any] | None = None) -> str:
    """A markdown page: what ranks the rows, the protocol card, the table (metric cells with their
    interval; ``≈`` marks a main-metric difference to the row above that is within the intervals),
    and the plots (``images``: plot name -> link or data URI, e.g. ``{"family_plot": "metric_per_family.png"}``)."""
    main = main_metric(metric_columns(df))
    shown = [c for c in df.columns if c not in ("lineage", "dataset_id", WITHIN) and not c.endswith((CI_LOW, CI_HIGH))
             and not (c in MODEL_COLUMNS and df[c].isna().all())]  # a diffusers model's identity, when any
    runs = df["run_id"].dropna().nunique()
    lines = [f"# {title}", "",
             f"{len(df)} evaluation{'s' if len(df) != 1 else ''} of {runs} run{'s' if runs != 1 else ''}"
             + (f", best first by **{main}** ({'lower' if lower_is_better(main) else 'higher'} is better)."
                if main else "; no metric to rank by."), "",
             *(["≈: the difference in the main metric to the row above is within the intervals (they overlap).", ""]
               if WITHIN in df.columns and df[WITHIN].eq(True).any() else []),
             *protocol_lines(protocol),
             "| " + " | ".join(c.replace("|", "\\|") for c in shown) + " |",
             "|" + "|".join("---:" if c in INT_COLUMNS or c in ("guidance",) or c in metric_columns(df) else "---"
                            for c in shown) + "|"]
    metric_set = set(metric_columns(df))
    for _, row in df.iterrows():
        cells = []
        for c in shown:
            text = _metric_cell(row, c, df) if c in metric_set else _cell(row[c])
            if c == main and WITHIN in df.columns and row[WITHIN] is True:
                text = "≈ " + text
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    captions = {"family_plot": f"{main} per family (best evaluation of each)",
                "nfe_plot": f"{main} against NFE: one panel per teacher, with its students"}
    for name, link in (images or {}).items():
        lines += ["", f"## {captions.get(name, name)}", "", f"![{captions.get(name, name)}]({link})"]
    return "\n".join(lines) + "\n"


def _best_per_family(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    have = df[df[metric].notna()]
    pick = have.sort_values(metric, ascending=lower_is_better(metric), kind="stable")
    return pick.groupby("family", sort=True, as_index=False).head(1).sort_values("family")


def plot_family(df: pd.DataFrame, png: Path) -> None:
    """Bars: the main metric of each family's best evaluation, labelled with its run and NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(metric_columns(df))
    best = _best_per_family(df, metric) if metric else df.iloc[:0]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(best) + 2), 3.6), dpi=100)
    if best.empty:
        ax.text(0.5, 0.5, "no metric values", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        bars = ax.bar(best["family"].astype(str), best[metric], color=[f"C{i}" for i in range(len(best))])
        for bar, (_, r) in zip(bars, best.iterrows()):
            nfe = "?" if pd.isna(r["nfe"]) else int(r["nfe"])
            ax.annotate(f"{str(r['run_id'])[:8]}\nNFE {nfe}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)", fontsize=8)
        ax.set_xlabel("family")
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, png)
    plt.close(fig)


def plot_nfe(df: pd.DataFrame, png: Path) -> None:
    """The main metric against NFE: one panel per teacher (lineage), a solid line for the teacher and a
    dashed line per student (runs distilled from it, directly or through earlier rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(metric_columns(df))
    have = df[df["nfe"].notna() & df[metric].notna()] if metric else df.iloc[:0]
    groups = list(dict.fromkeys(have["lineage"].fillna(have["run_id"]).tolist()))
    cols = max(1, min(3, len(groups)))
    nrows = max(1, -(-len(groups) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), dpi=100, squeeze=False)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no evaluations with an NFE", ha="center", va="center",
                        transform=axes[0][0].transAxes)
        axes[0][0].set_axis_off()
    for i, group in enumerate(groups):
        ax = axes[i // cols][i % cols]
        members = have[have["lineage"].fillna(have["run_id"]) == group]
        for j, (run_id, g) in enumerate(members.groupby("run_id", sort=False)):
            g = g.sort_values("nfe")
            is_teacher = run_id == group
            ax.plot(g["nfe"].astype(float), g[metric], marker="o", linestyle="-" if is_teacher else "--",
                    color=f"C{j}", label=f"{g['family'].iloc[0]} {str(run_id)[:8]}"
                                         + (" (teacher)" if is_teacher and len(members["run_id"].unique()) > 1 else ""))
        ax.set_xscale("log", base=2)
        ticks = sorted({int(v) for v in members["nfe"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric, fontsize=8)
        ax.set_title(f"teacher {str(group)[:8]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(groups), nrows * cols):
        if k:
            axes[k // cols][k % cols].set_axis_off()
    fig.tight_layout()
    _save(fig, png)
    plt.close(fig)


def _save(fig: Any, png: Path) -> None:
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, png)


def write_leaderboard(df: pd.DataFrame, out_dir: Path | str, protocol: dict[str, Any] | None = None) -> dict[str, str]:
    """``leaderboard.parquet``, ``leaderboard.md`` (linking the plots) and the two PNG plots in
    ``out_dir``, each written atomically; their paths by kind (keys of ``FILES``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / name for k, name in FILES.items()}
    tmp = out / f".{FILES['parquet']}.tmp-{os.getpid()}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, paths["parquet"])
    plot_family(df, paths["family_plot"])
    plot_nfe(df, paths["nfe_plot"])
    md = leaderboard_markdown(df, {"family_plot": FILES["family_plot"], "nfe_plot": FILES["nfe_plot"]},
                              protocol=protocol)
    tmp = out / f".{FILES['markdown']}.tmp-{os.getpid()}"
    tmp.write_text(md)
    os.replace(tmp, paths["markdown"])
    return {k: str(p) for k, p in paths.items()}


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows as JSON-able dicts (NaN / NA -> None, numpy scalars -> Python)."""
    out = []
    for row in df.astype(object).to_dict(orient="records"):
        out.append({k: (None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))
                        else (v.item() if hasattr(v, "item") else v)) for k, v in row.items()})
    return out


def build_leaderboard(root: Path | str, eval_summaries: list[EvalSummary],
                      card: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`leaderboard` written by :func:`write_leaderboard` to ``<root>/leaderboards/<id>/`` with a
    ``card.json`` (written last; ``card`` adds fields such as the settings).  The id hashes the
    evaluation ids and this code, so the same evaluations give the same folder."""
    if not eval_summaries:
        raise ValueError("a leaderboard needs at least one evaluation")
    import sys

    from imagegen.evaluate import protocol as P

    df = leaderboard(root, eval_summaries)
    lid = stable_hash({"evals": sorted(str(s["eval_id"]) for s in eval_summaries),
                       "code": code_version(sys.modules[__name__], P)})
    out = leaderboards_dir(root) / lid
    protocol = P.leaderboard_protocol([s.get("protocol") or {} for s in eval_summaries])
    paths = write_leaderboard(df, out, protocol)
    main = main_metric(metric_columns(df))
    summary = {"leaderboard_id": lid, "path": str(out), "files": paths, "main_metric": main,
               "lower_is_better": lower_is_better(main) if main else None,
               "runs": list(dict.fromkeys(df["run_id"].dropna().tolist())),
               "eval_ids": [s["eval_id"] for s in eval_summaries], "rows": records(df), "protocol": protocol}
    write_json_atomic(out / "card.json", {**summary, **(card or {}), "created_unix": round(time.time(), 3)})
    return summary


def comparable(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Why leaderboards ``a`` and ``b`` (their summaries or ``card.json``) cannot be compared, from
    their protocol cards; an empty list means they can (same extractors, weights, resize mode,
    reference statistics, sample count, seeds per evaluation and interval settings)."""
    from imagegen.evaluate.protocol import comparability

    for name, lb in (("A", a), ("B", b)):
        if not lb.get("protocol"):
            return [f"leaderboard {name} ({lb.get('leaderboard_id')}) has no protocol card (built before cards existed)"]
    return comparability(a["protocol"], b["protocol"])
