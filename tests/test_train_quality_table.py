"""benchmarks/train_quality.py's budget columns and the README block it writes (no training here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tq():
    spec = importlib.util.spec_from_file_location("train_quality", ROOT / "benchmarks" / "train_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_quality", mod)
    spec.loader.exec_module(mod)
    return mod


TQ = _tq()


def _row(family, budget, steps, fd, geneval=None, first=None):
    m = {"FD-CLIP-abc": fd, "KD-CLIP-abc": fd / 1e4}
    if geneval is not None:
        m.update({"CLIPScore": 0.4, "GenEval overall": geneval})
    return {"family": family, "budget_cpu_s": budget, "steps": steps, "metrics": m, "sampler": "euler", "nfe": 20,
            "first_stage_family": first}


def test_budgets_and_pinned_steps_parse_and_bad_ones_are_refused():
    assert TQ.parse_budgets("100, 600,100") == [100.0, 600.0]
    for bad in ("", "0", "abc", "100,-5"):
        with pytest.raises(ValueError, match="--budgets"):
            TQ.parse_budgets(bad)
    assert TQ.parse_steps_for(["flow=30", "vae@600=7"]) == {("flow", None): 30, ("vae", 600.0): 7}
    with pytest.raises(ValueError, match="FAMILY=N"):
        TQ.parse_steps_for(["flow"])


def test_table_has_a_column_group_per_budget_ordered_by_the_largest_budgets_fd():
    rows = [_row("vae", 100, 500, 900.0), _row("vae", 600, 3000, 800.0),
            _row("flow", 100, 200, 3000.0, geneval=0.1), _row("flow", 600, 1200, 400.0, geneval=0.55),
            _row("latent_flow", 100, 900, 1200.0, geneval=0.2, first="kl_autoencoder")]
    table = TQ.markdown_table(rows, [100.0, 600.0])
    lines = table.splitlines()
    assert "steps @100" in lines[0] and "FD ↓ @600" in lines[0] and "GenEval ↑ @600" in lines[0]
    assert len(lines[0].split("|")) == len(lines[1].split("|")) == len(lines[2].split("|"))
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["flow", "vae", "latent_flow (on kl_autoencoder)"]
    flow = lines[2].split("|")
    assert [c.strip() for c in flow[8:13]] == ["1200", "400", "40.0", "0.40", "0.55"]  # its 600 CPU-s cells
    assert lines[4].count("–") == 5  # latent_flow has no 600 CPU-s row
    assert lines[3].split("|")[6].strip() == "–"  # vae: no GenEval (not text-conditioned)


def test_readme_block_is_replaced_between_the_markers_only(tmp_path):
    text = f"intro\n{TQ.README_BEGIN}\nold table\n{TQ.README_END}\noutro\n"
    out = TQ.replace_readme_block(text, f"{TQ.README_BEGIN}\nnew\n{TQ.README_END}")
    assert out == f"intro\n{TQ.README_BEGIN}\nnew\n{TQ.README_END}\noutro\n"
    assert TQ.replace_readme_block(out, f"{TQ.README_BEGIN}\nnew\n{TQ.README_END}") == out  # idempotent
    for bad in ("no markers", f"{TQ.README_END}\n{TQ.README_BEGIN}", f"{TQ.README_BEGIN}{TQ.README_BEGIN}{TQ.README_END}"):
        with pytest.raises(ValueError, match="README"):
            TQ.replace_readme_block(bad, "x")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    meta = {"preset": "smoke", "budgets": [100.0, 600.0], "threads": 1, "n_eval": 300, "geneval_per_prompt": 1,
            "date": "2026-12-02", "cpus": 2, "load_average": (1.0, 1.0, 1.0), "families": ["vae", "flow"]}
    TQ.write_readme(readme, TQ.readme_block(TQ.markdown_table([_row("vae", 100, 5, 9.0)], [100.0]), meta))
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith("\noutro\n") and "old table" not in new
    assert "do not edit by hand" in new and "| vae |" in new


def test_the_project_readme_carries_exactly_one_block():
    text = (ROOT / "README.md").read_text()
    assert text.count(TQ.README_BEGIN) == 1 and text.count(TQ.README_END) == 1
