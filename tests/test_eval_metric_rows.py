"""The phase-1 metrics as rows of the metric table, computed through ``evaluate``: FD-DINOv2,
precision/recall/density/coverage, CMMD, Inception Score (a recorded skip without its weights),
reward/aesthetic rows, GenEval with the OWLv2 detector, DPG-Bench with a VQA model; every row with
its interval, resample count and sample-count flags; each value checked against the metric's own
module on the same images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from _eval_models import tiny_dinov2, tiny_llava, tiny_owlv2
from _helpers import eval_world_root
from imagegen.evaluate.run import EvalRequest, evaluate


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("rows-root")
    eval_world_root(r, n=40, per_shard=20)
    return r


@pytest.fixture(scope="module")
def folder(root) -> Path:
    """24 world scenes the reference does not hold (indices 500..), with their captions."""
    from imagegen.world.scene import WorldConfig, render_scene

    out = root / "images"
    out.mkdir()
    lines = []
    for i in range(24):
        scene, image = render_scene(WorldConfig(), 500 + i)
        image.convert("RGB").save(out / f"{i:03d}.png")
        lines.append(json.dumps({"file": f"{i:03d}.png", "caption": scene.caption}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.slow  # ~45 s on the shared cores (tiny DINOv2 at 224 px, bootstraps)
def test_phase1_metrics_through_evaluate(root, folder, tmp_path, one_torch_thread):
    from imagegen.clip import load_clip
    from imagegen.evaluate import cmmd as C, dinov2 as D, prdc as P
    from imagegen.evaluate.run import Source, reference_images

    dino = tiny_dinov2(tmp_path / "dino", hidden=32)
    clip_dir = root / "models" / "reference_clip" / "testclip"
    torch.manual_seed(0)
    head = {k: v.contiguous() for k, v in __import__("imagegen.filters.aesthetic_mlp", fromlist=["x"])
            .AestheticMLP(load_clip(f"local-dir:{clip_dir}").embed_dim).state_dict().items()}
    save_file(head, str(tmp_path / "head.safetensors"))
    req = dict(folder=str(folder), reference="world-tiny",
               metrics=["fid", "fd_dinov2", "prdc", "cmmd", "inception_score", "reward", "clipscore"],
               dinov2_model=str(dino), n_resamples=40, batch_size=8, kid_subsets=4, kid_subset_size=8,
               reward_models=[{"kind": "aesthetic", "path": str(tmp_path / "head.safetensors"),
                               "clip": f"local-dir:{clip_dir}"}])
    with pytest.warns(UserWarning, match="at least 33 are needed"):  # 24 samples of 32-d DINOv2 features
        got = evaluate(req, root)
    m = got["metrics"]
    fd_name = next(k for k in m if k.startswith("FD-DINOv2-"))
    assert {"CMMD", "Reward LAION-aesthetic"} <= set(m) and any(k.startswith("FD-CLIP-") for k in m)
    assert "IS" not in m and "Inception weights" in got["skipped"]["inception_score"]
    rows = pd.read_parquet(got["metrics_file"]).set_index("metric")
    # every row carries an interval around its value, with the resample count recorded
    assert (rows["n_resamples"] == 40).all()
    assert (rows["ci_low"] <= rows["ci_high"]).all()
    plain = rows[~rows["ci_method"].str.contains("bias")]  # k-NN rows: shifted by the resamples' bias
    assert len(plain) >= 4 and (plain["ci_low"] <= plain["value"] + 1e-9).all()
    assert (plain["value"] <= plain["ci_high"] + 1e-9).all()
    assert set(got["intervals"]) == set(m)
    # FD with fewer samples than the feature dimension is flagged, saying how many are needed
    assert rows.loc[fd_name, "flagged"] and "33" in json.loads(rows.loc[fd_name, "flags"])[0]
    assert got["flags"][fd_name] and rows.loc["CMMD", "flagged"] == False  # noqa: E712
    # each value equals the metric's own module on the same images and reference images
    src = Source(EvalRequest(**req), root)
    ref_files = reference_images(src, Image.open(folder / "000.png").size[0], None, 0)
    files = sorted(folder.glob("*.png"))
    direct = D.fd_dinov2(files, ref_files, str(dino), num_workers=0)
    assert m[fd_name] == pytest.approx(direct["value"], rel=1e-6)
    pr = P.prdc(direct["features"]["reference"], direct["features"]["generated"], 3)
    for key, name in (("precision", "Precision"), ("recall", "Recall"), ("density", "Density"),
                      ("coverage", "Coverage")):
        col = next(k for k in m if k.startswith(name))
        assert m[col] == pytest.approx(pr[key])
    # the same CLIP batch size as the evaluation: CPU kernels may round differently per batch shape,
    # and CMMD near 0 is a difference of large terms
    cm = C.cmmd_images(f"local-dir:{clip_dir}", files, ref_files, batch_size=req["batch_size"])
    assert m["CMMD"] == pytest.approx(cm["value"], rel=1e-5)
    # the reward row names its model and the prompt set
    assert "captions.jsonl of folder" in rows.loc["Reward LAION-aesthetic", "prompt_set"]
    assert "head_sha256" in rows.loc["Reward LAION-aesthetic", "model"]
    # the protocol card names the extractor weights and the reference statistics of FD-DINOv2
    card = got["protocol"]["metrics"][fd_name]
    assert len(card["extractor_weights_sha256"]) >= 16 and len(card["reference_stats_sha256"]) == 64
    assert got["protocol"]["n_samples"] == 24 and got["protocol"]["seeds"] == [0]


DPG = [("p1", "a red circle", "circle", 1, "0", "entity", "whole", "entity - whole (circle)", "Is there a circle?"),
       ("p1", "a red circle", "red", 2, "1", "attribute", "color", "attribute - color (circle, red)", "Is it red?"),
       ("p2", "a blue square", "square", 1, "0", "entity", "whole", "entity - whole (square)", "Is there a square?")]


@pytest.mark.slow  # tiny OWLv2 + LLaVA through evaluate
def test_geneval_with_owlv2_and_dpg_with_a_vqa_model(root, tmp_path, one_torch_thread):
    from imagegen.evaluate import geneval as G

    owl = tiny_owlv2(tmp_path / "owl")
    layout = tmp_path / "layout"
    prompts = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
               {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}]
    rng = np.random.default_rng(1)
    G.generate_layout(layout, prompts, 2, lambda meta, n, i: [Image.fromarray(
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)])
    got = evaluate(dict(folder=str(layout), metrics=["geneval"], detector=f"owlv2:{owl}", n_resamples=20), root)
    rows = pd.read_parquet(got["metrics_file"]).set_index("metric")
    assert not rows.loc["GenEval overall", "comparable_with_published"]
    assert "not comparable" in rows.loc["GenEval overall", "note"]
    assert rows["n_resamples"].eq(20).all() and "GenEval overall" in got["intervals"]

    vqa = tiny_llava(tmp_path / "llava")
    csv_path = tmp_path / "dpg.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                    "category_detailed", "tuple", "question_natural_language"])
        w.writerows(DPG)
    imgs = tmp_path / "dpg"
    imgs.mkdir()
    for item in ("p1", "p2"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(imgs / f"{item}.png")
    got = evaluate(dict(folder=str(imgs), metrics=["dpg"], vqa_model=str(vqa), dpg_questions=str(csv_path),
                        n_resamples=20), root)
    from imagegen.evaluate.vqa import TransformersVQA, dpg_score, read_dpg_questions

    direct = dpg_score(read_dpg_questions(csv_path), {k: [Image.open(imgs / f"{k}.png").convert("RGB")]
                                                       for k in ("p1", "p2")}, TransformersVQA(str(vqa)))
    assert got["metrics"]["DPG-Bench"] == pytest.approx(direct["value"])
    row = pd.read_parquet(got["metrics_file"]).iloc[0]
    assert not row["comparable_with_published"] and row["n_prompts"] == 2


def test_metric_requests_refused_before_work(root, folder):
    with pytest.raises(ValueError, match="reward_models"):
        EvalRequest(folder=str(folder), metrics=["reward"])
    with pytest.raises(ValueError, match="vqa_model"):
        EvalRequest(folder=str(folder), metrics=["dpg"])
    with pytest.raises(ValueError, match="needs run="):
        EvalRequest(folder=str(folder), metrics=["clipscore"], n_seeds=2)
    with pytest.raises(FileNotFoundError, match="DINOv2 weights"):
        evaluate(dict(folder=str(folder), reference="world-tiny", metrics=["fd_dinov2"],
                      dinov2_model=str(folder / "missing")), root)


@pytest.mark.slow  # a tiny training + three evaluations
def test_n_seeds_reruns_generation_and_reports_mean_and_std(root, one_torch_thread):
    from _helpers import tiny_text_run

    run_id = tiny_text_run(root, steps=4)
    req = dict(run=run_id, metrics=["fid", "clipscore"], n_samples=12, steps=2, batch_size=12, n_resamples=10,
               kid_subsets=2, kid_subset_size=4)
    got = evaluate({**req, "n_seeds": 2}, root)
    one = [evaluate({**req, "seed": s}, root) for s in (0, 1)]
    assert all(o["reused"] for o in one), "the per-seed evaluations are the combined one's parts"
    a = Image.open(Path(one[0]["path"]) / "samples" / "00000.png")
    b = Image.open(Path(one[1]["path"]) / "samples" / "00000.png")
    assert np.asarray(a).tolist() != np.asarray(b).tolist(), "independent seeds give other images"
    rows = pd.read_parquet(got["metrics_file"]).set_index("metric")
    for name, value in got["metrics"].items():
        per = [o["metrics"][name] for o in one]
        assert value == pytest.approx(np.mean(per))
        assert rows.loc[name, "seed_std"] == pytest.approx(np.std(per, ddof=1))
        assert rows.loc[name, "ci_low"] <= value <= rows.loc[name, "ci_high"]
        assert rows.loc[name, "n_seeds"] == 2 and "Student t" in rows.loc[name, "ci_method"]
    assert got["n_seeds"] == 2 and got["protocol"]["seeds"] == [0, 1]
