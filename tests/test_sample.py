"""imagegen sample: PNGs with their generation parameters, a grid, batch-independent seeds, the
dwtDct watermark and its check, class names for class runs, refusals before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _helpers import TINY_UNET, eval_world_root, tiny_text_run
from PIL import Image

from imagegen.sample import (SampleError, SampleRequest, apply_watermark, check_watermark, read_parameters,
                             sample)


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("sample-root")
    eval_world_root(root, n=32)
    return root, tiny_text_run(root, steps=2)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_writes_pngs_with_parameters_and_a_grid(text_root, tmp_path):
    root, run = text_root
    req = SampleRequest(run=run, prompts=["a red circle", "two blue squares"], n=3, batch_size=2, steps=3, seed=7,
                        out=str(tmp_path / "a"))
    res = (sample(req, root))
    assert res["n_images"] == 6 and len(res["files"]) == 6 and Path(res["grid"]).is_file()
    grid = Image.open(res["grid"])
    assert grid.size == (3 * 16, 2 * 16)
    params = [read_parameters(f) for f in res["files"]]
    assert [p["prompt"] for p in params] == ["a red circle"] * 3 + ["two blue squares"] * 3
    p0 = params[0]
    assert p0["model"]["run"] == run and p0["model"]["family"] == "flow" and len(p0["model"]["tensors_sha256"]) == 64
    assert p0["seed"] == 7 and p0["steps"] == 3 and p0["sampler"] == res["sampler"] and p0["guidance"] == 1.0
    assert p0["negative"] is None and p0["loras"] == [] and p0["watermark"] is None and p0["nfe"] >= 3
    assert len({p["image_seed"] for p in params}) == 6
    lines = (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["file"] for x in lines] == [Path(f).name for f in res["files"]]

    # one image at a time: the same pixels (each image's noise comes from its own seed)
    res1 = (sample(req.model_copy(update={"batch_size": 1, "out": str(tmp_path / "b")}), root))
    for a, b in zip(res["files"], res1["files"]):
        assert np.array_equal(_pixels(Path(a)), _pixels(Path(b)))
    # CFG with a negative prompt changes the images and is recorded
    res2 = (sample(req.model_copy(update={"guidance": 3.0, "negative": "a green star",
                                                            "out": str(tmp_path / "c")}), root))
    p2 = read_parameters(res2["files"][0])
    assert p2["guidance"] == 3.0 and p2["negative"] == "a green star"
    # the PNG's parameters alone remake the image through the family's own sampler
    import torch

    from imagegen.train.runs import get_run
    from models.reflow import pair_noise
    from models.checkpoint import load_family

    fam = load_family(get_run(root, run).checkpoint)
    x = (fam.sample(1, conditioning=[p2["prompt"]], negative=[p2["negative"]], guidance=p2["guidance"],
                                      sampler=p2["sampler"], steps=p2["steps"],
                                      x_T=pair_noise([p2["image_seed"]], fam.noise_shape)))
    again = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(again, _pixels(Path(res2["files"][0])))


def test_watermark_round_trip(text_root, tmp_path):
    root, run = text_root
    req = SampleRequest(run=run, prompts=["a red circle"], n=2, steps=2, output_size=256, watermark="imagegen",
                        out=str(tmp_path / "wm"))
    res = (sample(req, root))
    for f in res["files"]:
        assert Image.open(f).size == (256, 256)
        got = check_watermark(f, "imagegen")
        assert got["detected"] and got["bit_match"] >= 0.9 and got["recorded_in_png"]["method"] == "dwtDct"
    plain = (sample(req.model_copy(update={"watermark": None, "out": str(tmp_path / "plain")}), root))
    assert not check_watermark(plain["files"][0], "imagegen")["detected"]
    # on a real photograph no one here made (scikit-learn's bundled china.jpg)
    sk = pytest.importorskip("sklearn.datasets")
    photo = Image.open(Path(sk.__file__).parent / "images" / "china.jpg").convert("RGB")
    photo.save(tmp_path / "photo.png")
    apply_watermark(photo, "imagegen").save(tmp_path / "photo-wm.png")
    assert check_watermark(tmp_path / "photo-wm.png")["detected"]
    assert not check_watermark(tmp_path / "photo.png")["detected"]
    assert not check_watermark(tmp_path / "photo-wm.png", "other-tx")["detected"]
    # too small for dwtDct: refused before any image is made
    with pytest.raises(SampleError, match="at least 256 x 256"):
        sample(req.model_copy(update={"output_size": None, "out": str(tmp_path / "small")}), root)
    assert not (tmp_path / "small").exists()


def test_refusals(text_root, tmp_path):
    root, run = text_root
    with pytest.raises(ValueError, match="is not in the Hugging Face cache"):
        sample(SampleRequest(model="diffusers:nobody-here/no-such-model", prompts=["x"]), root)
    with pytest.raises(ValueError, match="unknown model spec"):
        SampleRequest(model="hf:thing", prompts=["x"])
    with pytest.raises(SampleError, match="LoRA adapter a.safetensors does not exist"):
        sample(SampleRequest(run=run, prompts=["x"], loras=["a.safetensors:0.5"]), root)
    with pytest.raises(LookupError):
        sample(SampleRequest(run="nosuchrun", prompts=["x"]), root)
    with pytest.raises(SampleError, match="give prompts"):
        sample(SampleRequest(run=run), root)
    with pytest.raises(SampleError, match="unknown sampler"):
        sample(SampleRequest(run=run, prompts=["x"], sampler="nope"), root)
    with pytest.raises(SampleError, match="does not exist"):
        sample(SampleRequest(run=run, prompts_file=str(tmp_path / "none.txt")), root)
    # model="run:ID" is the same as run=ID; prompts from a file
    (tmp_path / "p.txt").write_text("a red circle\n\na blue square\n")
    res = (sample(SampleRequest(model=f"run:{run}", prompts_file=str(tmp_path / "p.txt"), n=1,
                                                  steps=1, grid=False, out=str(tmp_path / "f")), root))
    assert res["prompts"] == ["a red circle", "a blue square"] and res["grid"] is None


def test_class_run_on_imported_digits_samples_by_class_name(tmp_path):
    """import (HF digits) -> train a class-conditional run on its labels -> sample by class name."""
    datasets = pytest.importorskip("datasets")
    sk = pytest.importorskip("sklearn.datasets")
    from imagegen.importers import ImportConfig, import_dataset
    from imagegen.train.runs import train_run

    digits = sk.load_digits()
    pix = (digits.images[:40] * 255 / 16).round().astype(np.uint8)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    datasets.Dataset.from_dict({"image": [Image.fromarray(p).convert("RGB") for p in pix],
                                "label": digits.target[:40].tolist()}, features=feats).save_to_disk(str(tmp_path / "hf"))
    root = tmp_path / "data"
    import_dataset(ImportConfig(kind="hf", source=str(tmp_path / "hf"), image_column="image", label_column="label",
                                name="digits"), root)
    req = {"dataset": "digits", "train": {
        "family": "flow", "model": {**TINY_UNET, "conditioning": "class"}, "label_field": "label", "steps": 2,
        "batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "ckpt_every": 2, "epoch_batches": 2, "shuffle_buffer": 8,
        "sample_count": 2, "sample_steps": 1}}
    run = (train_run(req, root)["run_id"])
    res = (sample(SampleRequest(run=run, prompts=["7", "3"], n=2, steps=2, guidance=2.0,
                                                  negative="1", out=str(tmp_path / "s")), root))
    assert res["n_images"] == 4 and read_parameters(res["files"][2])["prompt"] == "3"
    with pytest.raises(SampleError, match=r"names none of the 10 classes .*\['0', '1'"):
        sample(SampleRequest(run=run, prompts=["cat"]), root)


def test_cli_sample_and_check_watermark(text_root, tmp_path, capsys):
    from imagegen.cli import main

    root, run = text_root
    code = (main(["sample", "--run", run, "--prompt", "a red circle", "--n", "1", "--steps", "1",
                                    "--output-size", "256", "--watermark", "--out", str(tmp_path / "cli"),
                                    "--data-root", str(root), "--no-prefect", "--json"]))
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_images"] == 1 and out["watermark"] == "imagegen"
    assert main(["sample", "--check-watermark", out["files"][0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["detected"] is True
    assert main(["sample", "--model", "diffusers:x/y", "--prompt", "a", "--data-root", str(root)]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_flow_through_prefect(text_root, tmp_path, prefect_server):
    from flows.sample import sample_flow

    root, run = text_root
    res = (sample_flow(request=SampleRequest(run=run, prompts=["a red circle"], n=2, steps=1,
                                                               out=str(tmp_path / "flow")), data_root=str(root)))
    assert res["n_images"] == 2 and read_parameters(res["files"][0])["model"]["run"] == run


def test_sampling_runs_on_a_pinned_thread_count_that_is_part_of_its_id(text_root, tmp_path, monkeypatch):
    """Issue 12: CPU float reductions split by the thread count, so sampling runs on ``threads`` (default
    1, never the machine's), the count is in the sample id, and the count in force before is restored."""
    import torch

    import models.reflow
    from imagegen.determinism import DEFAULT_THREADS

    root, run = text_root
    seen: list[int] = []
    orig = models.reflow.pair_noise

    def pair_noise(*a, **k):  # the real noise, recording the thread count sampling runs on
        seen.append(torch.get_num_threads())
        return orig(*a, **k)

    monkeypatch.setattr(models.reflow, "pair_noise", pair_noise)
    req = SampleRequest(run=run, prompts=["a red circle"], n=2, steps=2, out=str(tmp_path / "one"))
    assert req.threads == DEFAULT_THREADS == 1
    before = torch.get_num_threads()
    one = sample(req, root)
    assert seen and set(seen) == {1}
    seen.clear()
    two = sample(req.model_copy(update={"threads": 2, "out": str(tmp_path / "two")}), root)
    assert seen and set(seen) == {2} and torch.get_num_threads() == before
    assert one["sample_id"] != two["sample_id"]


def test_sample_reads_only_the_checkpoint_metadata_before_loading(text_root, tmp_path):
    """The sample id comes from state.json and the safetensors header (models.checkpoint.read_state:
    no tensor read, no hash); the tensors are checked against the recorded sha256 when the family
    loads, so a corrupt tensor file stops the sample before its folder is made."""
    import shutil

    from imagegen.train.runs import get_run
    from models.checkpoint import CheckpointError, read_state, verify_checkpoint

    root, run = text_root
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    ck = Path(get_run(copy, run).checkpoint)
    assert ck.resolve().is_relative_to(copy.resolve())
    f = ck / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: the header still parses, the sha256 no longer matches
    f.write_bytes(bytes(data))
    assert read_state(ck)["step"] == verify_checkpoint(Path(get_run(root, run).checkpoint))["step"]
    with pytest.raises(CheckpointError, match="corrupt"):
        verify_checkpoint(ck)
    with pytest.raises(CheckpointError, match="corrupt"):
        sample(SampleRequest(run=run, prompts=["a red circle"], n=1, steps=1, out=str(tmp_path / "out")), copy)
    assert not (tmp_path / "out").exists()
    (ck / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="unknown format"):
        read_state(ck)
