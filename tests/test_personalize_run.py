"""LoRA, textual inversion and DreamBooth as runs of the generic trainer (family ``personalize``,
models/personalize.py): run ids and checkpoints through ``train_run``, only the chosen parameters
change, the checkpoint samples (``imagegen sample``), prior preservation logs its loss, bad configs
are refused before any step, and the control metric scores the subject by detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import TINY_UNET, eval_world_root, tiny_text_run


TEXT = {**TINY_UNET, "conditioning": "text", "text_encoder": "world"}
COMMON = {"batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "ckpt_every": 3, "epoch_batches": 2, "shuffle_buffer": 8,
          "sample_count": 2, "sample_steps": 2, "steps": 3}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("personalize-run")
    eval_world_root(root)
    return {"root": root, "base": tiny_text_run(root, "flow", steps=4)}


def _run(world, **model):
    from imagegen.train.runs import get_run, train_run
    from models.checkpoint import load_family

    out = train_run({"dataset": "world-tiny", "train": {
        "family": "personalize", "model": {**TEXT, "base": f"run:{world['base']}", **model}, **COMMON}}, world["root"])
    ref = get_run(world["root"], out["run_id"])
    return out["run_id"], ref, load_family(ref.checkpoint)


def _px(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _init(folder):
    from imagegen.world.scene import WorldConfig, render_scene

    _, im = render_scene(WorldConfig(), 700)
    path = folder / "init.png"
    im.convert("RGB").resize((16, 16), resample=Image.Resampling.BICUBIC).save(path)
    return path


def _base(world):
    from imagegen.train.runs import get_run
    from models.checkpoint import load_family

    return load_family(get_run(world["root"], world["base"]).checkpoint)


def test_lora_run_trains_only_the_adapter_and_samples(world, tmp_path):
    from imagegen.sample import SampleRequest, sample

    rid, ref, fam = _run(world, method="lora", lora_rank=2, prompt="a photo of a sks star", subject="star")
    assert ref.card["family"] == "personalize" and ref.card["status"] == "finished"
    base = _base(world).net.state_dict()
    own = fam.net.state_dict()
    lora = [k for k in own if "lora_" in k]
    assert lora and any(own[k].abs().max() > 0 for k in lora if "lora_B" in k)  # the adapter trained
    for k, v in own.items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k  # the base weights did not
    assert 0 < fam.trainable_fraction < 0.2
    from imagegen.evaluate.run import EvalRequest, run_evaluation

    summary = run_evaluation(EvalRequest(run=rid, metrics=["control"], control_scenes=4, steps=2, n_resamples=10),
                             world["root"])
    m = summary["metrics"]
    assert 0 <= m["Control subject detection"] <= 1 and 0 <= m["Control subject detection (base)"] <= 1
    assert m["Control trainable fraction"] == pytest.approx(fam.trainable_fraction) and "Control drift" in m
    res = sample(SampleRequest(run=rid, prompts=["a photo of a sks star"], n=2, steps=2, out=str(tmp_path / "s")),
                 world["root"])
    assert res["n_images"] == 2
    # the run's adapter over its base (lora=run:<id>, merged): the run's own images
    over = sample(SampleRequest(run=world["base"], prompts=["a photo of a sks star"], n=2, steps=2,
                                loras=[f"run:{rid}"], out=str(tmp_path / "over")), world["root"])
    for a, b in zip(res["files"], over["files"]):
        assert np.abs(_px(a) - _px(b)).max() <= 1
    from imagegen.sample import read_parameters

    lo = read_parameters(over["files"][0])["loras"][0]
    assert lo["run"] == rid and lo["scale"] == 1.0
    assert lo["sha256"] == read_parameters(res["files"][0])["model"]["tensors_sha256"]
    from imagegen.sample import SampleError

    with pytest.raises(SampleError, match="is a personalize run: give its base as run"):
        sample(SampleRequest(run=rid, prompts=["x"], loras=[f"run:{rid}"]), world["root"])
    with pytest.raises(SampleError, match=f"run {world['base']} is a 'flow' run, not a personalize 'lora' run"):
        sample(SampleRequest(run=world["base"], prompts=["x"], loras=[f"run:{world['base']}"]), world["root"])


def test_textual_inversion_run_changes_only_the_embedding(world, tmp_path):
    rid, _, fam = _run(world, method="textual_inversion", prompt="a photo of a sks star", init_word="star")
    base = _base(world).state_dict()
    own = {k: v for k, v in fam.state_dict().items() if not k.startswith("ti.")}
    assert all(torch.equal(v, base[k[len("inner."):]]) for k, v in own.items())
    from models.personalize import TextualInversion

    start = TextualInversion(str(fam.inner.cfg.text_encoder), "sks", "star").embedding
    assert (fam.ti.embedding - start).abs().max() > 1e-4
    # the run's embedding over its base (embedding=run:<id>): the run's own images; a LoRA name for it is refused
    from imagegen.sample import SampleError, SampleRequest, read_parameters, sample

    common = {"prompts": ["a photo of a sks star"], "n": 1, "steps": 2}
    own = sample(SampleRequest(run=rid, **common, out=str(tmp_path / "own")), world["root"])
    over = sample(SampleRequest(run=world["base"], **common, embedding=[f"run:{rid}"], out=str(tmp_path / "over")),
                  world["root"])
    assert np.abs(_px(own["files"][0]) - _px(over["files"][0])).max() <= 1
    assert read_parameters(over["files"][0])["embedding"][0] == {
        "run": rid, "token": "sks", "checkpoint_step": 3, "sha256": read_parameters(own["files"][0])["model"]["tensors_sha256"]}
    # a personalize run edits as its base's family, with its embedding: SDEdit at strength 1 = its own sampling
    plain = sample(SampleRequest(run=world["base"], **common, out=str(tmp_path / "plain")), world["root"])
    assert not np.array_equal(_px(plain["files"][0]), _px(own["files"][0]))  # (same weights: the embedding acts)
    init = _init(tmp_path)
    full = sample(SampleRequest(run=rid, **common, init_image=str(init), strength=1.0, out=str(tmp_path / "e1")),
                  world["root"])
    assert np.abs(_px(full["files"][0]) - _px(own["files"][0])).max() <= 1
    zero = sample(SampleRequest(run=rid, **common, init_image=str(init), strength=0.0, out=str(tmp_path / "e0")),
                  world["root"])
    assert np.array_equal(_px(zero["files"][0]), _px(init))
    with pytest.raises(SampleError, match=f"is a personalize 'textual_inversion' run, not a personalize 'lora' run "
                                          fr"\(give it as embedding=run:{rid}\)"):
        sample(SampleRequest(run=world["base"], **common, loras=[f"run:{rid}"]), world["root"])


def test_dreambooth_run_with_prior_preservation(world):
    _, ref, fam = _run(world, method="dreambooth", prompt="a photo of a sks star",
                       prior_prompt="a photo of a star", prior_count=4, prior_steps=2)
    import pandas as pd

    logs = pd.read_parquet(ref.path / "metrics.parquet")
    assert {"log/loss_prior", "log/loss_subject"} <= set(logs.columns) and logs["log/loss_prior"].notna().all()
    base = _base(world).net.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in fam.net.state_dict().items())
    assert fam.trainable_fraction == 1.0


def test_bad_configs_refused_before_work(world):
    from imagegen.train.runs import train_run

    def run(**model):
        return train_run({"dataset": "world-tiny", "train": {
            "family": "personalize", "model": {**TEXT, "base": f"run:{world['base']}", **model}, **COMMON}},
            world["root"])

    with pytest.raises(ValueError, match="must contain it"):
        run(method="textual_inversion", prompt="a photo of a star")
    with pytest.raises(ValueError, match="must be a caption"):
        run(method="lora", prompt=3)
    with pytest.raises(ValueError, match="keep the teacher's settings"):
        run(method="lora", image_size=32)



def test_personalize_through_the_cli(world, tmp_path, capsys):
    """`imagegen train --family personalize` over the smoke preset: the base run's net, size and
    conditioning replace the preset's (a class U-Net at 32 px) and its class settings are dropped;
    then `imagegen sample --lora run:<id>` over the base."""
    import json

    from imagegen.cli import main

    root = str(world["root"])
    sets = {"train.model.base": f"run:{world['base']}", "train.model.method": "lora", "train.model.lora_rank": 2,
            "train.model.prompt": "a photo of a sks star", "train.batch_size": 4, "train.warmup_steps": 0,
            "train.epoch_batches": 2, "train.shuffle_buffer": 8, "train.sample_count": 2, "train.sample_steps": 2,
            "train.ckpt_every": 2}
    args = ["train", "--family", "personalize", "--dataset", "world-tiny", "--steps", "2", "--data-root", root,
            "--no-prefect", "--json", *[x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]]
    assert main(args) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from imagegen.train.runs import get_run

    card = get_run(world["root"], out["run_id"]).card
    base_cfg = get_run(world["root"], world["base"]).card["config"]
    assert card["family"] == "personalize" and card["status"] == "finished"
    for f in ("net", "image_size", "conditioning", "net_overrides"):
        assert card["config"]["model"][f] == base_cfg["model"][f], f
    assert card["config"]["label_keywords"] == [] and card["config"]["model"]["lora_rank"] == 2
    assert main(["sample", "--run", world["base"], "--lora", f"run:{out['run_id']}:0.5", "--prompt", "a sks star",
                 "--n", "1", "--steps", "2", "--out", str(tmp_path / "s"), "--data-root", root, "--no-prefect",
                 "--json"]) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from imagegen.sample import read_parameters

    lo = read_parameters(res["files"][0])["loras"][0]
    assert lo["run"] == out["run_id"] and lo["scale"] == 0.5 and lo["spec"] == f"run:{out['run_id']}:0.5"
    # a setting given on the command line that the base fixes is still refused, naming it
    assert main([*args, "--set", "train.model.image_size=32"]) == 2
    assert "image_size: student 32 != teacher 16" in capsys.readouterr().err
