"""The command line as a new user meets it: --preset on every command that runs work, the
distillation method taken from the teacher's family, the families listed."""

from __future__ import annotations

import pytest

from imagegen.cli import build_parser, main
from imagegen.pipeline import DISTILL_PRESETS, EVAL_PRESETS, PIPELINE_PRESETS
from imagegen.requests import build_distill_request, build_eval_request
from models.registry import FAMILIES, describe_families


def test_every_work_command_takes_a_preset():
    parser = build_parser()
    for argv in (["curate"], ["train"], ["pipeline"], ["distill", "--teacher", "t"], ["evaluate", "--run", "r"]):
        args = parser.parse_args([*argv, "--preset", "smoke"])
        assert args.preset == "smoke", argv


def test_distill_and_evaluate_presets_are_the_pipeline_stage_settings():
    smoke = PIPELINE_PRESETS["smoke"]
    req = build_distill_request(teacher="abc", method="reflow", preset="smoke")
    assert req.steps == smoke["distill"]["steps"] and req.pairs == smoke["distill"]["overrides"]["pairs"]
    assert build_distill_request(teacher="abc", method="reflow", preset="smoke", overrides=["steps=3"]).steps == 3
    ev = build_eval_request(run="r", preset="smoke")
    assert ev.n_samples == smoke["evaluate"]["n_samples"] and ev.kid_subsets == 50
    assert set(DISTILL_PRESETS) == set(EVAL_PRESETS) == set(PIPELINE_PRESETS)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        build_eval_request(run="r", preset="nope")


def test_an_evaluated_model_spec_is_taken_as_written():
    # a path holding '=' or looking like JSON is not run through the --set parser
    for spec in ("diffusers:/models/run=3/pipe", "diffusers:123", "diffusers:null"):
        assert build_eval_request(model=spec, overrides=["steps=4"]).model == spec
    assert build_eval_request(run="r").model is None


def test_families_prints_one_line_per_family(capsys):
    assert main(["families"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [f["name"] for f in describe_families()]
    assert len(lines) == len(names) and [ln.split()[0] for ln in lines] == names
    assert set(names) <= set(FAMILIES) and {"ddpm", "flow", "edm", "reflow"} <= set(names)


def test_train_help_lists_the_families_and_a_training_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--set train.lr=3e-4" in text
    for f in describe_families():
        assert f"\n  {f['name']} " in text


def test_distill_without_method_names_the_unknown_teacher(tmp_path, capsys):
    """With --method omitted the teacher run decides; an unknown one is refused (exit 2) at once."""
    assert main(["distill", "--teacher", "nope", "--data-root", str(tmp_path), "--no-prefect"]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_natural_method_of_each_teacher_family():
    from models.teacher import METHODS, REFERENCE_ONLY, TEACHERS, methods_for

    assert {f: methods_for(f, METHODS)[:1] for f in ("flow", "ddpm", "edm", "reflow", "progressive", "gan")} == {
        "flow": ["reflow"], "ddpm": ["progressive"], "edm": ["consistency"], "reflow": ["reflow"],
        "progressive": ["progressive"], "gan": []}
    assert set(METHODS) <= set(TEACHERS) | set(REFERENCE_ONLY) and set(TEACHERS) | set(REFERENCE_ONLY) <= set(FAMILIES)
