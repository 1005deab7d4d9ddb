"""imagegen sample's editing and control options (imagegen/sample_edit.py) on tiny runs trained
here: SDEdit's strength 0 returns the init image, inpainting keeps the unmasked pixels exactly,
outpainting, the inversion edit, ControlNet runs (as run and as controlnet=, another base refused),
a LoRA adapter and a textual-inversion embedding, the parameters chunk that remakes the image,
refusals before any work, the CLI and the deployment's parameter schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import TINY_UNET, eval_world_root, tiny_text_run
from PIL import Image

from imagegen.sample import SampleError, SampleRequest, read_parameters, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDIT_FIELDS = ("init_image", "strength", "mask", "outpaint", "resample", "invert", "source_prompt", "control",
               "control_scale", "control_is_map", "controlnet", "embedding", "loras")


@pytest.fixture(scope="module")
def edit_root(tmp_path_factory) -> tuple[Path, str, Path]:
    root = tmp_path_factory.mktemp("edit-root")
    eval_world_root(root, n=32)
    run = tiny_text_run(root, steps=2)
    from imagegen.world.scene import WorldConfig, render_scene

    _, im = render_scene(WorldConfig(), 700)
    init = root / "init.png"
    im.convert("RGB").resize((16, 16), resample=Image.Resampling.BICUBIC).save(init)
    return root, run, init


def _px(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _mask(path: Path, rows: slice | None = None, value: int = 255, size: tuple[int, int] = (16, 16)) -> Path:
    a = np.zeros(size[::-1], dtype=np.uint8) if rows is not None else np.full(size[::-1], value, dtype=np.uint8)
    if rows is not None:
        a[rows] = 255
    Image.fromarray(a).save(path)
    return path


def test_sdedit_strength_endpoints_and_the_chunk_remakes_the_image(edit_root, tmp_path):
    root, run, init = edit_root
    base = {"run": run, "prompts": ["a red circle"], "n": 2, "steps": 3, "seed": 5}
    res0 = sample(SampleRequest(**base, init_image=str(init), strength=0.0, out=str(tmp_path / "s0")), root)
    for f in res0["files"]:
        assert np.array_equal(_px(f), _px(init))  # strength 0: the init image, exactly (pixel family)
    p = read_parameters(res0["files"][0])
    assert p["edit"]["mode"] == "sdedit" and p["edit"]["strength"] == 0.0 and p["nfe"] == 0
    assert p["edit"]["init_image"]["sha256"] and p["control"] is None and res0["edit"] == "sdedit"

    # strength 1 starts from the same noise as plain sampling
    plain = sample(SampleRequest(**base, out=str(tmp_path / "plain")), root)
    res1 = sample(SampleRequest(**base, init_image=str(init), strength=1.0, out=str(tmp_path / "s1")), root)
    for a, b in zip(plain["files"], res1["files"]):
        assert np.abs(_px(a).astype(int) - _px(b).astype(int)).max() <= 1
    mid = sample(SampleRequest(**base, init_image=str(init), strength=0.6, out=str(tmp_path / "mid")), root)
    pm = read_parameters(mid["files"][1])
    assert 0 < pm["nfe"] < read_parameters(plain["files"][1])["nfe"] + 1
    assert not np.array_equal(_px(mid["files"][1]), _px(init))

    # the PNG's parameters chunk alone rebuilds the request and the same pixels
    again = sample(SampleRequest(**{**pm["request"], "out": str(tmp_path / "again")}), root)
    assert np.array_equal(_px(again["files"][1]), _px(mid["files"][1]))
    assert read_parameters(again["files"][1])["request"] == pm["request"]
    assert again["sample_id"] == mid["sample_id"]
    # another init image with the same name is another sample id (its sha256 is hashed in)
    other = tmp_path / "init.png"
    Image.fromarray(255 - _px(init)).save(other)
    moved = sample(SampleRequest(**{**pm["request"], "init_image": str(other), "out": str(tmp_path / "o")}), root)
    assert moved["sample_id"] != mid["sample_id"]


def test_inpainting_keeps_the_unmasked_pixels_exactly(edit_root, tmp_path):
    root, run, init = edit_root
    base = {"run": run, "prompts": ["two blue squares"], "n": 2, "steps": 4, "init_image": str(init)}
    mask = _mask(tmp_path / "m.png", rows=slice(4, 12))
    res = sample(SampleRequest(**base, mask=str(mask), resample=2, out=str(tmp_path / "in")), root)
    keep = np.asarray(Image.open(mask)) == 0
    for f in res["files"]:
        out = _px(f)
        assert np.array_equal(out[keep], _px(init)[keep])
        assert not np.array_equal(out[~keep], _px(init)[~keep])
    p = read_parameters(res["files"][0])
    assert p["edit"]["mode"] == "inpaint" and p["edit"]["strength"] == 1.0 and p["edit"]["resample"] == 2
    assert p["edit"]["mask_generate_fraction"] == 0.5 and p["edit"]["trivial"] is None

    # the trivial masks are said and handled: all black = the init image, all white = SDEdit at strength 1
    said: list[str] = []
    zero = sample(SampleRequest(**base, mask=str(_mask(tmp_path / "z.png", value=0)), out=str(tmp_path / "z")), root,
                  progress=said.append)
    assert all(np.array_equal(_px(f), _px(init)) for f in zero["files"])
    assert "all zeros" in read_parameters(zero["files"][0])["edit"]["trivial"] and any("all zeros" in m for m in said)
    ones = sample(SampleRequest(**base, mask=str(_mask(tmp_path / "o.png", value=255)), out=str(tmp_path / "o")), root)
    assert "all ones" in ones["trivial"]

    # outpainting: a 16x10 image with 6 rows to generate above it
    small = tmp_path / "small.png"
    Image.fromarray(_px(init)[6:]).save(small)
    out = sample(SampleRequest(**{**base, "init_image": str(small)}, outpaint=[0, 6, 0, 0], out=str(tmp_path / "op")),
                 root)
    for f in out["files"]:
        assert np.array_equal(_px(f)[6:], _px(init)[6:])
    assert read_parameters(out["files"][0])["edit"]["outpaint"] == [0, 6, 0, 0]


def test_inversion_edit(edit_root, tmp_path):
    root, run, init = edit_root
    req = SampleRequest(run=run, prompts=["a green star"], n=1, steps=6, init_image=str(init), invert=True,
                        source_prompt="a red circle", out=str(tmp_path / "inv"))
    res = sample(req, root)
    p = read_parameters(res["files"][0])
    assert p["edit"]["mode"] == "invert" and p["edit"]["source_prompt"] == "a red circle"
    assert p["sampler"] == "euler" and p["nfe"] == 12  # 6 steps backwards + 6 forwards
    # the same prompt as the source walks back to (near) the init image; another prompt moves away
    same = sample(req.model_copy(update={"prompts": ["a red circle"], "out": str(tmp_path / "same")}), root)
    d_same = np.abs(_px(same["files"][0]).astype(int) - _px(init).astype(int)).mean()
    d_edit = np.abs(_px(res["files"][0]).astype(int) - _px(init).astype(int)).mean()
    assert d_same < 3 and d_edit >= d_same


def test_refusals_before_any_work(edit_root, tmp_path):
    root, run, init = edit_root
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\].*got 1.5"):
        SampleRequest(run=run, prompts=["x"], init_image=str(init), strength=1.5)
    with pytest.raises(ValueError, match="mask need init_image"):
        SampleRequest(run=run, prompts=["x"], mask="m.png")
    with pytest.raises(ValueError, match="not both"):
        SampleRequest(run=run, prompts=["x"], init_image=str(init), mask="m.png", outpaint=[1, 0, 0, 0])
    with pytest.raises(ValueError, match="need control"):
        SampleRequest(run=run, prompts=["x"], control_scale=0.5)
    big = tmp_path / "big.png"
    Image.new("RGB", (20, 18)).save(big)
    out = tmp_path / "never"
    cases = [
        ({"init_image": str(big)}, rf"init image {big} is 20x18, but run {run} makes 16x16"),
        ({"init_image": str(init), "mask": str(_mask(tmp_path / "m8.png", value=0, size=(8, 8)))},
         rf"mask {tmp_path / 'm8.png'} is 8x8, the init image {init} is 16x16"),
        ({"init_image": str(init), "outpaint": [2, 0, 0, 0]}, r"16x16; with margins left=2 .* canvas is 18x16"),
        ({"init_image": str(tmp_path / "none.png")}, "init image .* does not exist"),
        ({"control": str(init)}, "control= needs a ControlNet"),
        ({"controlnet": run}, "is a 'flow' run, not a ControlNet"),
        ({"loras": [str(init) + ":0.5"]}, "single-file adapter"),
        ({"loras": [str(tmp_path) + ":0.5"]}, "not a peft adapter folder"),
        ({"embedding": str(init)}, "only safetensors"),
        ({"init_image": str(init), "invert": True, "sampler": "heun"}, "leave sampler unset"),
    ]
    for extra, msg in cases:
        with pytest.raises(SampleError, match=msg):
            sample(SampleRequest(run=run, prompts=["x"], out=str(out), **extra), root)
    assert not out.exists()


def _adapter(root: Path, run: str, folder: Path, seed: int, rank: int = 2, targets=None) -> Path:
    from imagegen.train.runs import get_run
    from models.checkpoint import load_family
    from models.lora import add_lora, save_lora

    fam = load_family(get_run(root, run).checkpoint)
    add_lora(fam, rank=rank, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in fam.net.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    return save_lora(fam, folder)


def test_lora_and_embedding(edit_root, tmp_path):
    from imagegen.sample import Prepared
    from imagegen.train.runs import get_run
    from models.checkpoint import load_family
    from models.personalize import TextualInversion

    root, run, init = edit_root
    fam = load_family(get_run(root, run).checkpoint)
    folder = _adapter(root, run, tmp_path / "adapter", seed=0)
    other = _adapter(root, run, tmp_path / "adapter2", seed=1, rank=3, targets=["qkv", "emb_proj"])
    base = {"run": run, "prompts": ["a sks circle"], "n": 1, "steps": 3}
    plain = sample(SampleRequest(**base, out=str(tmp_path / "plain")), root)
    off = sample(SampleRequest(**base, loras=[f"{folder}:0", f"{other}:0"], out=str(tmp_path / "off")), root)
    on = sample(SampleRequest(**base, loras=[f"{folder}:1.5", f"{other}:-0.5"], out=str(tmp_path / "on")), root)
    assert np.abs(_px(off["files"][0]).astype(int) - _px(plain["files"][0]).astype(int)).max() <= 1
    assert not np.array_equal(_px(on["files"][0]), _px(plain["files"][0]))
    lo = read_parameters(on["files"][0])["loras"]
    assert [d["scale"] for d in lo] == [1.5, -0.5] and all(len(d["sha256"]) == 64 for d in lo)
    assert lo[0]["spec"] == f"{folder}:1.5" and "path" not in lo[0]
    # the two adapters at (1.5, -0.5): the run's weights plus 1.5 B1 A1 - 0.5 B2 A2, merged by hand
    from safetensors.torch import load_file

    prep = Prepared(SampleRequest(**base, loras=[f"{folder}:1.5", f"{other}:-0.5"]), root)
    merged = {k.replace(".base_layer", ""): v for k, v in prep.edit.load(prep, "cpu").net.state_dict().items()
              if "lora_" not in k}
    want = {k: v.clone() for k, v in fam.net.state_dict().items()}
    for f, scale in ((folder, 1.5), (other, -0.5)):
        sd = load_file(str(f / "adapter_model.safetensors"))
        for k in sd:
            if ".lora_A." in k:
                mod = k[len("base_model.model."):].rsplit(".lora_A.", 1)[0]
                want[mod + ".weight"] += scale * sd[k.replace(".lora_A.", ".lora_B.")] @ sd[k]  # alpha = r
    assert merged.keys() == want.keys()
    assert all(torch.allclose(merged[k], want[k], atol=1e-6) for k in want)
    assert any(not torch.equal(want[k], v) for k, v in fam.net.state_dict().items())
    # an adapter for another base: the first mismatched tensor named, before any model is built
    from _helpers import random_family

    wide = random_family("flow", {**TINY_UNET, "net_overrides": {**TINY_UNET["net_overrides"], "model_channels": 32}})
    from models.lora import add_lora, save_lora

    add_lora(wide, rank=2)
    alien = save_lora(wide, tmp_path / "alien")
    with pytest.raises(SampleError, match=r"does not fit run \S+'s net: shape mismatch: \S+lora_[AB]\.weight is \[\d+, "
                                          r"\d+\] in the adapter but run \S+'s net needs \[\d+, \d+\]"):
        Prepared(SampleRequest(**base, loras=[str(folder), str(alien)]), root)

    spec = str(fam.cfg.text_encoder)
    ti = TextualInversion(spec, "sks")
    with torch.no_grad():
        ti.embedding.normal_(0, 1.0)
    emb = ti.save(tmp_path / "ti")
    req = SampleRequest(**base, embedding=str(emb), out=str(tmp_path / "ti-out"))
    with_ti = sample(req, root)
    assert read_parameters(with_ti["files"][0])["embedding"][0]["token"] == "sks"
    assert with_ti["sample_id"] != plain["sample_id"]
    # (a 2-step run barely listens to its prompt: the embedding is checked where it acts, the condition)
    prep = Prepared(req, root)
    f2 = prep.edit.load(prep, "cpu")
    before = f2.condition_from(["a sks circle"], 1, "test")["pooled"]
    with prep.edit.context(f2):
        during = f2.condition_from(["a sks circle"], 1, "test")["pooled"]
        other = f2.condition_from(["a red circle"], 1, "test")["pooled"]
    assert not torch.allclose(before, during)
    assert torch.equal(other, f2.condition_from(["a red circle"], 1, "test")["pooled"])
    # two embeddings at once (one token each): each acts where its token occurs; a token defined twice is refused
    ti2 = TextualInversion(spec, "star")
    with torch.no_grad():
        ti2.embedding.normal_(0, 1.0)
    emb2 = ti2.save(tmp_path / "ti2")
    prep = Prepared(SampleRequest(**base, embedding=[str(emb), str(emb2)]), root)
    assert [e["token"] for e in prep.edit.inputs["embedding"]] == ["sks", "star"]
    with prep.edit.context(f2):
        both = f2.condition_from(["a sks star"], 1, "test")["pooled"]
    with Prepared(SampleRequest(**base, embedding=[str(emb)]), root).edit.context(f2):
        one = f2.condition_from(["a sks star"], 1, "test")["pooled"]
    assert not torch.allclose(both, one)
    with pytest.raises(SampleError, match="'sks' is defined more than once"):
        Prepared(SampleRequest(**base, embedding=[str(emb), str(emb)]), root)
    bad = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"sks": ti.embedding.detach()}, str(bad), metadata={"text_encoder": "open_clip:ViT-B-32"})
    with pytest.raises(SampleError, match="learned for the text encoder 'open_clip:ViT-B-32'"):
        sample(SampleRequest(**base, embedding=str(bad)), root)


def test_controlnet_runs_through_the_cli(edit_root, tmp_path, capsys):
    from imagegen.cli import main
    from imagegen.train.runs import train_run

    root, run, init = edit_root
    common = {"batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "ema_decay": 0.9, "ckpt_every": 2, "epoch_batches": 2,
              "shuffle_buffer": 16, "sample_count": 2, "sample_steps": 2}
    model = {**TINY_UNET, "conditioning": "text", "text_encoder": "world"}
    cn = train_run({"dataset": "world-tiny", "train": {"family": "controlnet", "steps": 2, **common,
                                                       "model": {**model, "base": f"run:{run}", "signal": "canny"}}},
                   root)["run_id"]
    args = ["sample", "--prompt", "a red circle", "--n", "1", "--steps", "2", "--data-root", str(root),
            "--no-prefect", "--json"]

    def cli(*extra: str) -> dict:
        assert main([*args, *extra]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    a = cli("--run", run, "--controlnet", cn, "--control", str(init), "--control-scale", "0.5",
            "--out", str(tmp_path / "a"))
    pa = read_parameters(a["files"][0])
    assert pa["control"]["controlnet"]["run"] == cn and pa["control"]["scale"] == 0.5
    assert pa["control"]["signal"] == "canny" and pa["model"]["run"] == run
    b = cli("--run", cn, "--control", str(init), "--control-scale", "0.5", "--out", str(tmp_path / "b"))
    assert read_parameters(b["files"][0])["model"]["family"] == "controlnet"
    assert np.array_equal(_px(a["files"][0]), _px(b["files"][0]))  # the same ControlNet either way
    # the map itself (a grayscale edge image), with SDEdit and with inpainting under control
    edges = tmp_path / "edges.png"
    Image.fromarray(np.where(np.arange(16)[None, :].repeat(16, 0) % 5 == 0, 255, 0).astype(np.uint8)).save(edges)
    mask = _mask(tmp_path / "m.png", rows=slice(0, 8))
    c = cli("--run", cn, "--control", str(edges), "--control-is-map", "--init-image", str(init), "--mask", str(mask),
            "--out", str(tmp_path / "c"))
    keep = np.asarray(Image.open(mask)) == 0
    assert np.array_equal(_px(c["files"][0])[keep], _px(init)[keep])
    assert read_parameters(c["files"][0])["control"]["is_map"] is True
    # a ControlNet trained on another base run is refused, naming both
    other = tiny_text_run(root, steps=2, seed=1)
    assert main([*args, "--run", other, "--controlnet", cn, "--control", str(init)]) == 2
    err = capsys.readouterr().err
    assert f"ControlNet run {cn} was trained on the base checkpoint" in err and other in err
    # the wrong control size names both
    big = tmp_path / "big.png"
    Image.new("RGB", (32, 32)).save(big)
    assert main([*args, "--run", cn, "--control", str(big)]) == 2
    assert "is 32x32, but run" in capsys.readouterr().err


def test_trained_inpainting_run(edit_root, tmp_path):
    from imagegen.train.runs import train_run

    root, run, init = edit_root
    inp = train_run({"dataset": "world-tiny", "train": {
        "family": "inpainting", "model": {**TINY_UNET, "conditioning": "text", "text_encoder": "world",
                                          "inner": "flow"},
        "steps": 2, "batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "ckpt_every": 2, "epoch_batches": 2,
        "shuffle_buffer": 16, "sample_count": 2, "sample_steps": 2}}, root)["run_id"]
    mask = _mask(tmp_path / "m.png", rows=slice(0, 5))
    res = sample(SampleRequest(run=inp, prompts=["a red circle"], n=2, steps=3, init_image=str(init), mask=str(mask),
                               out=str(tmp_path / "ti")), root)
    keep = np.asarray(Image.open(mask)) == 0
    assert all(np.array_equal(_px(f)[keep], _px(init)[keep]) for f in res["files"])
    p = read_parameters(res["files"][0])
    assert p["edit"]["trained_inpainting"] is True and p["nfe"] > 0
    with pytest.raises(SampleError, match="trained inpainting model"):
        sample(SampleRequest(run=inp, prompts=["x"], init_image=str(init), strength=0.5), root)


def test_cli_edit_and_the_deployment_schema(edit_root, tmp_path, capsys):
    from prefect.utilities.callables import parameter_schema

    from flows.sample import sample_flow
    from imagegen.cli import main

    root, run, init = edit_root
    mask = _mask(tmp_path / "m.png", rows=slice(8, 16))
    code = main(["sample", "--run", run, "--prompt", "a red circle", "--n", "1", "--steps", "2", "--init-image",
                 str(init), "--mask", str(mask), "--strength", "0.9", "--data-root", str(root), "--out",
                 str(tmp_path / "cli"), "--no-prefect", "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    p = read_parameters(res["files"][0])
    assert p["edit"]["mode"] == "inpaint" and p["edit"]["strength"] == 0.9
    assert p["request"]["init_image"] == str(init.resolve()) and p["request"]["mask"] == str(mask.resolve())
    assert np.array_equal(_px(res["files"][0])[:8], _px(init)[:8])
    assert main(["sample", "--run", run, "--prompt", "x", "--init-image", str(init), "--strength", "2",
                 "--data-root", str(root), "--no-prefect"]) == 2
    assert "strength must lie in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--run", run, "--prompt", "x", "--init-image", str(init), "--outpaint", "1,2",
              "--data-root", str(root), "--no-prefect"])
    assert "four integers L,T,R,B, got '1,2'" in capsys.readouterr().err

    # the deployment's form: every editing and control option is a typed field of the request
    schema = parameter_schema(sample_flow).model_dump_for_openapi()
    props = schema["definitions"]["SampleRequest"]["properties"]
    for field in EDIT_FIELDS:
        assert field in props, field
    assert props["strength"]["anyOf"][0]["minimum"] == 0.0 and props["strength"]["anyOf"][0]["maximum"] == 1.0
    assert props["invert"]["type"] == "boolean" and props["resample"]["type"] == "integer"
    import yaml

    deps = {d["name"]: d for d in yaml.safe_load(Path("prefect.yaml").read_text())["deployments"]}
    assert deps["sample"]["entrypoint"] == "flows/sample.py:sample_flow"


@pytest.mark.slow
def test_inpainting_through_the_prefect_flow(edit_root, tmp_path, prefect_server):
    from flows.sample import sample_flow

    root, run, init = edit_root
    mask = _mask(tmp_path / "m.png", rows=slice(0, 8))
    res = sample_flow(request=SampleRequest(run=run, prompts=["a red circle"], n=1, steps=2, init_image=str(init),
                                            mask=str(mask), out=str(tmp_path / "flow")), data_root=str(root))
    assert res["edit"] == "inpaint"
    assert np.array_equal(_px(res["files"][0])[8:], _px(init)[8:])
    with pytest.raises(SampleError, match="is 8x8, the init image"):
        sample_flow(request=SampleRequest(run=run, prompts=["x"], init_image=str(init),
                                          mask=str(_mask(tmp_path / "m8.png", value=0, size=(8, 8)))),
                    data_root=str(root))


def test_aspect_bucket_sizes_in_sample_and_evaluation(edit_root, tmp_path, capsys):
    """height/width for an any-size (flow) run: the images are W x H and the PNG chunk remakes them;
    a size off the net's multiple (and height/width for a diffusers model) is refused before any
    work; outpainting onto an extended canvas keeps the init image's pixels exactly; an
    evaluation generates its set at the bucket's size."""
    import json

    from imagegen.cli import main
    from imagegen.evaluate.run import EvalError, EvalRequest, evaluate

    root, run, init = edit_root
    base = {"run": run, "prompts": ["a red circle"], "n": 2, "steps": 2}
    wide = sample(SampleRequest(**base, height=16, width=24, out=str(tmp_path / "w")), root)
    assert all(Image.open(f).size == (24, 16) for f in wide["files"])
    p = read_parameters(wide["files"][0])
    assert p["model_size"] == [24, 16] and p["request"]["width"] == 24
    again = sample(SampleRequest(**p["request"], out=str(tmp_path / "w2")), root)  # the chunk remakes it
    assert np.array_equal(_px(again["files"][0]), _px(wide["files"][0]))
    with pytest.raises(SampleError, match=r"height/width 25x16 \(width x height\): run \S+ samples sides that are "
                                          r"multiples of 2 \(the unet downsampling 2\); e.g. 24x16"):
        sample(SampleRequest(**base, width=25), root)
    with pytest.raises(ValueError, match="resolution= .* or height=/width=, not both"):
        SampleRequest(model="diffusers:/nowhere", prompts=["x"], height=16, resolution=16)
    # outpainting onto an extended canvas: the 16x16 init image plus 8 px on the right, a 24x16 run sample
    out = sample(SampleRequest(**base, init_image=str(init), outpaint=[0, 0, 8, 0], width=24, out=str(tmp_path / "o")),
                 root)
    got = _px(out["files"][0])
    assert got.shape == (16, 24, 3) and np.array_equal(got[:, :16], _px(init))
    assert read_parameters(out["files"][0])["edit"]["mode"] == "outpaint"
    with pytest.raises(SampleError, match="canvas is 24x16, but run .* makes 16x16 images .*height=/width="):
        sample(SampleRequest(**base, init_image=str(init), outpaint=[0, 0, 8, 0]), root)
    # the CLI flags
    assert main(["sample", "--run", run, "--prompt", "a red circle", "--n", "1", "--steps", "2", "--height", "24",
                 "--width", "16", "--data-root", str(root), "--out", str(tmp_path / "cli"), "--no-prefect",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Image.open(res["files"][0]).size == (16, 24)
    assert main(["sample", "--run", run, "--prompt", "x", "--height", "17", "--data-root", str(root),
                 "--no-prefect"]) == 2
    assert "multiples of 2" in capsys.readouterr().err
    # evaluation at a bucket's size
    summary = evaluate(EvalRequest(run=run, metrics=["clipscore"], n_samples=4, steps=2, batch_size=4, height=16,
                                   width=24, n_resamples=0), root)
    made = sorted((Path(summary["path"]) / "samples").glob("*.png"))
    assert len(made) == 4 and all(Image.open(f).size == (24, 16) for f in made)
    with pytest.raises(EvalError, match="multiples of 2"):
        evaluate(EvalRequest(run=run, metrics=["clipscore"], n_samples=4, steps=2, width=31), root)
    with pytest.raises(ValueError, match="height/width apply to runs"):
        EvalRequest(folder=str(tmp_path), height=16)
