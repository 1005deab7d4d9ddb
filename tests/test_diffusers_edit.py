"""Editing and control for diffusers pipelines (models/diffusers_edit.py) on the tiny Stable
Diffusion pipeline of tests/_diffusers_tiny.py: img2img, inpainting and ControlNet give exactly what
diffusers' own pipelines give on the same inputs, the strength / scale endpoints behave, and
``imagegen sample`` takes them for a ``diffusers:`` model (bad inputs named before any work)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _diffusers_tiny import tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The pipeline, a ControlNet made from its UNet with random (nonzero) zero-convs, and 16 px inputs."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    root = tmp_path_factory.mktemp("diffusers-edit")
    pipe = tiny_sd_pipeline(root / "sd")
    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet", use_safetensors=True)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            # every zero-initialised output, the control embedding's included (else the control image
            # would change nothing)
            if any(k in name for k in ("zero_conv", "controlnet_down_blocks", "controlnet_mid_block",
                                       "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    cn.save_pretrained(root / "cn", safe_serialization=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "init.png")
    m = np.zeros((16, 16), np.uint8)
    m[:, 8:] = 255
    Image.fromarray(m).save(root / "mask.png")
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[4:12, 4] = edges[4:12, 11] = 255
    Image.fromarray(edges).save(root / "control.png")
    Image.new("RGB", (32, 32)).save(root / "big.png")
    return {"root": root, "spec": f"diffusers:{pipe}", "pipe": pipe, "cn": root / "cn"}


def _direct(cls, folder, **extra):
    p = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, safety_checker=None,
                            requires_safety_checker=False, **extra)
    p.set_progress_bar_config(disable=True)
    return p


def test_editing_equals_diffusers_own_pipelines(tiny):
    from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline)

    from models import diffusers_edit as E
    from models.hf_diffusers import DiffusersModel

    m = DiffusersModel(tiny["spec"])
    init, mask, ctl = (Image.open(tiny["root"] / f).convert(mode) for f, mode in
                       (("init.png", "RGB"), ("mask.png", "L"), ("control.png", "RGB")))
    prompts = ["a cat", "the dog"]
    common = dict(prompt=prompts, num_inference_steps=5, guidance_scale=2.0, output_type="pt", height=16, width=16)

    def gen(seed=0):
        return torch.Generator().manual_seed(seed)

    x, nfe = E.generate(m, E.edit_pipeline(m, "sdedit"), "sdedit", prompts, None, 5, 2.0, gen(), image=init,
                        strength=0.6)
    assert nfe == 3 * 1  # the last 60% of 5 steps (diffusers' rule); CFG runs both halves in one UNet call
    ref = _direct(StableDiffusionImg2ImgPipeline, tiny["pipe"])(image=[init] * 2, strength=0.6, generator=gen(),
                                                                **common).images * 2 - 1
    assert torch.allclose(x, ref.clamp(-1, 1), atol=1e-5)

    y, _ = E.generate(m, E.edit_pipeline(m, "inpaint"), "inpaint", prompts, None, 5, 2.0, gen(), image=init,
                      mask=mask, strength=1.0)
    ref = _direct(StableDiffusionInpaintPipeline, tiny["pipe"])(image=[init] * 2, mask_image=[mask] * 2, strength=1.0,
                                                                generator=gen(), **common).images * 2 - 1
    assert torch.allclose(y, ref.clamp(-1, 1), atol=1e-5)

    cn = E.load_controlnet(tiny["cn"], m)
    z = torch.randn(2, 4, 8, 8, generator=gen(3))
    c1, _ = E.generate(m, E.edit_pipeline(m, "sample", cn), "sample", prompts, None, 5, 2.0, gen(), control=ctl,
                       control_scale=1.0, latents=z)
    direct = _direct(StableDiffusionControlNetPipeline, tiny["pipe"],
                     controlnet=ControlNetModel.from_pretrained(tiny["cn"], use_safetensors=True))
    ref = direct(image=[ctl] * 2, controlnet_conditioning_scale=1.0, latents=z.clone(), generator=gen(),
                 **common).images * 2 - 1
    assert torch.allclose(c1, ref.clamp(-1, 1), atol=1e-5)
    # scale 0: the base pipeline's images on the same noise; scale 1 changes them
    c0, _ = E.generate(m, E.edit_pipeline(m, "sample", cn), "sample", prompts, None, 5, 2.0, gen(), control=ctl,
                       control_scale=0.0, latents=z)
    plain = m.sample(2, prompts, steps=5, guidance=2.0, x_T=z)
    assert torch.allclose(c0, plain, atol=1e-5) and not torch.allclose(c1, plain, atol=1e-3)


def test_imagegen_sample_edits_a_diffusers_model(tiny, tmp_path):
    from imagegen.sample import SampleError, SampleRequest, read_parameters, sample

    r = tiny["root"]
    base = dict(model=tiny["spec"], prompts=["a cat"], n=2, steps=4, guidance=2.0)
    a = sample(SampleRequest(**base, init_image=str(r / "init.png"), strength=0.5, out=str(tmp_path / "a")),
               tmp_path / "root")
    p = read_parameters(a["files"][0])
    assert p["edit"]["mode"] == "sdedit" and p["edit"]["strength"] == 0.5 and p["nfe"] == 2
    b = sample(SampleRequest(**base, init_image=str(r / "init.png"), mask=str(r / "mask.png"), out=str(tmp_path / "b")),
               tmp_path / "root")
    assert read_parameters(b["files"][0])["edit"]["mode"] == "inpaint"
    c = sample(SampleRequest(**base, control=str(r / "control.png"), controlnet=str(tiny["cn"]), control_scale=0.7,
                             control_is_map=True, out=str(tmp_path / "c")), tmp_path / "root")
    pc = read_parameters(c["files"][0])
    assert pc["control"]["scale"] == 0.7 and len(pc["control"]["controlnet"]["sha256"]) == 64
    assert pc["control"]["is_map"] is True and pc["control"]["signal"] is None
    again = sample(SampleRequest(**base, control=str(r / "control.png"), controlnet=str(tiny["cn"]), control_scale=0.7,
                                 control_is_map=True, out=str(tmp_path / "c2")), tmp_path / "root")
    for f, g in zip(c["files"], again["files"]):
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(g)))
    with pytest.raises(SampleError, match="32x32.*16x16"):
        sample(SampleRequest(**base, init_image=str(r / "big.png")), tmp_path / "root")
    with pytest.raises(SampleError, match="controlnet"):
        sample(SampleRequest(**base, control=str(r / "control.png")), tmp_path / "root")
    with pytest.raises(SampleError, match="not a diffusers ControlNetModel"):
        sample(SampleRequest(**base, control=str(r / "control.png"), controlnet=str(r)), tmp_path / "root")
    with pytest.raises(ValueError, match="resample: not supported for diffusers"):
        SampleRequest(**base, init_image=str(r / "init.png"), mask=str(r / "mask.png"), resample=2)


def test_two_loras_equal_merging_them_by_hand(tiny, tmp_path):
    """Two diffusers adapters at scales (a, b) through set_adapters = the UNet with a B1 A1 + b B2 A2
    added to its weights by hand; scales 0 = the base; recorded in the PNG."""
    from _diffusers_tiny import random_unet_lora
    from safetensors.torch import load_file

    from imagegen.sample import SampleRequest, read_parameters, sample
    from models.hf_diffusers import DiffusersModel

    f1 = random_unet_lora(tiny["pipe"], tmp_path / "l1", seed=1)
    f2 = random_unet_lora(tiny["pipe"], tmp_path / "l2", rank=2, seed=2)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = {"steps": 3, "x_T": x}
    both = DiffusersModel(tiny["spec"], loras=[f"{f1}:0.6", f"{f2}:-1.2"])
    ours = both.sample(1, ["a cat"], **kw)
    hand = DiffusersModel(tiny["spec"])
    base = hand.sample(1, ["a cat"], **kw)
    weights = dict(hand.net.named_parameters())
    for f, scale in ((f1, 0.6), (f2, -1.2)):
        sd = load_file(str(f))
        for k in sd:
            if ".lora_A." in k:  # unet.<module>.lora_A.weight; alpha = rank
                mod = k[len("unet."):].rsplit(".lora_A.", 1)[0]
                with torch.no_grad():
                    weights[mod + ".weight"].add_(scale * sd[k.replace(".lora_A.", ".lora_B.")] @ sd[k])
    ref = hand.sample(1, ["a cat"], **kw)
    assert float((ref - base).abs().max()) > 1e-3  # the adapters act
    assert torch.allclose(ours, ref, atol=1e-4)
    zero = DiffusersModel(tiny["spec"], loras=[f"{f1}:0", f"{f2}:0"]).sample(1, ["a cat"], **kw)
    assert torch.allclose(zero, base, atol=1e-6)
    res = sample(SampleRequest(model=tiny["spec"], prompts=["a cat"], n=1, steps=2, loras=[f"{f1}:0.6", f"{f2}:-1.2"],
                               out=str(tmp_path / "s")), tmp_path / "root")
    p = read_parameters(res["files"][0])
    assert p["loras"] == [f"{f1}:0.6", f"{f2}:-1.2"]
    assert [d["scale"] for d in p["model"]["loras"]] == [0.6, -1.2] and p["model"]["loras"][1]["file"] == str(f2)


def test_inversion_outpainting_and_embeddings(tiny, tmp_path):
    """DDIM inversion = DiffEdit's invert (DDIMInverseScheduler) then DDIM sampling from its latents;
    outpainting = diffusers' inpainting of the canvas; a textual-inversion embedding in the
    project's file format = diffusers' load_textual_inversion; all through imagegen sample."""
    from diffusers import (DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline,
                           StableDiffusionInpaintPipeline, StableDiffusionPipeline)
    from safetensors.torch import save_file

    from imagegen.sample import SampleError, SampleRequest, read_parameters, sample
    from models import diffusers_edit as E
    from models.hf_diffusers import DiffusersError, DiffusersModel

    m = DiffusersModel(tiny["spec"])
    init = Image.open(tiny["root"] / "init.png").convert("RGB")
    z0 = E.image_latents(m, init)
    x, nfe = E.generate(m, E.edit_pipeline(m, "invert"), "invert", ["the dog"], None, 5, 2.0, None, image=init,
                        source="a cat")
    assert nfe == 5 + 5  # 5 inversion steps at guidance 1, 5 sampling steps (CFG in one batched call)
    c = m.pipe.components
    diffedit = StableDiffusionDiffEditPipeline(
        **{k: c[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
        inverse_scheduler=DDIMInverseScheduler.from_config(c["scheduler"].config))
    diffedit.set_progress_bar_config(disable=True)
    inverted = diffedit.invert(prompt="a cat", image=z0, num_inference_steps=5, inpaint_strength=1.0,
                               guidance_scale=1.0).latents[:, 0]
    assert torch.equal(E.ddim_invert(m, z0, ["a cat"], 5), inverted)
    ddim = _direct(StableDiffusionPipeline, tiny["pipe"])
    ddim.scheduler = DDIMScheduler.from_config(ddim.scheduler.config)
    ref = ddim(prompt=["the dog"], latents=inverted.clone(), num_inference_steps=5, guidance_scale=2.0,
               output_type="pt").images * 2 - 1
    assert torch.allclose(x, ref.clamp(-1, 1), atol=1e-5)
    assert type(m.pipe.scheduler).__name__ == type(c["scheduler"]).__name__  # the loaded pipeline's scheduler stays

    # outpainting: a 10x12 image with margins (2, 1, 4, 3) on the 16x16 canvas
    small = init.crop((0, 0, 10, 12))
    small.save(tmp_path / "small.png")
    canvas, mask = E.outpaint_canvas(small, [2, 1, 4, 3])
    assert canvas.size == (16, 16) and np.array_equal(np.asarray(canvas)[1:13, 2:12], np.asarray(small))
    assert (np.asarray(mask) == 0).sum() == 120 and np.asarray(mask)[0].min() == 255
    g = torch.Generator().manual_seed(4)
    res = sample(SampleRequest(model=tiny["spec"], prompts=["a cat"], n=1, steps=4, init_image=str(tmp_path / "small.png"),
                               outpaint=[2, 1, 4, 3], seed=0, out=str(tmp_path / "o")), tmp_path / "root")
    po = read_parameters(res["files"][0])
    assert po["edit"]["mode"] == "outpaint" and po["edit"]["outpaint"] == [2, 1, 4, 3]
    assert po["edit"]["mask_generate_fraction"] == pytest.approx(1 - 120 / 256)
    y, _ = E.generate(m, E.edit_pipeline(m, "outpaint"), "outpaint", ["a cat"], None, 4, 1.0, g, image=canvas,
                      mask=mask, strength=1.0)
    direct = _direct(StableDiffusionInpaintPipeline, tiny["pipe"])(
        prompt=["a cat"], image=[canvas], mask_image=[mask], strength=1.0, num_inference_steps=4, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(4), output_type="pt", height=16, width=16).images * 2 - 1
    assert torch.allclose(y, direct.clamp(-1, 1), atol=1e-5)
    with pytest.raises(SampleError, match="canvas is 17x16"):
        sample(SampleRequest(model=tiny["spec"], prompts=["a"], init_image=str(tmp_path / "small.png"),
                             outpaint=[3, 1, 4, 3]), tmp_path / "root")
    inv = sample(SampleRequest(model=tiny["spec"], prompts=["the dog"], n=1, steps=3, init_image=str(tiny["root"] / "init.png"),
                               invert=True, source_prompt="a cat", out=str(tmp_path / "i")), tmp_path / "root")
    pi = read_parameters(inv["files"][0])
    assert pi["edit"]["mode"] == "invert" and pi["edit"]["source_prompt"] == "a cat" and pi["nfe"] == 6

    # textual inversion: {token: vector} safetensors, as models/personalize.TextualInversion.save writes it
    vec = torch.randn(32, generator=torch.Generator().manual_seed(7))
    emb = tmp_path / "learned_embeds.safetensors"
    save_file({"sks": vec}, str(emb), metadata={"text_encoder": "user"})
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with_ti = DiffusersModel(tiny["spec"], embeddings=[str(emb)])
    a = with_ti.sample(1, ["a sks cat"], steps=3, x_T=z)
    direct = _direct(StableDiffusionPipeline, tiny["pipe"])
    direct.load_textual_inversion({"sks": vec}, token="sks")
    ref = direct(prompt=["a sks cat"], latents=z.clone(), num_inference_steps=3, guidance_scale=1.0,
                 output_type="pt").images * 2 - 1
    assert torch.allclose(a, ref.clamp(-1, 1), atol=1e-5)
    assert not torch.allclose(a, m.sample(1, ["a sks cat"], steps=3, x_T=z), atol=1e-3)  # the token acts
    assert torch.allclose(with_ti.sample(1, ["a cat"], steps=3, x_T=z), m.sample(1, ["a cat"], steps=3, x_T=z), atol=1e-6)
    ps = read_parameters(sample(SampleRequest(model=tiny["spec"], prompts=["a sks cat"], n=1, steps=2,
                                              embedding=[str(emb)], out=str(tmp_path / "t")), tmp_path / "root")["files"][0])
    assert ps["embedding"][0]["token"] == "sks" and ps["model"]["embeddings"][0]["sha256"] == ps["embedding"][0]["sha256"]
    wide = tmp_path / "wide.safetensors"
    save_file({"xyz": torch.zeros(48)}, str(wide))
    with pytest.raises(DiffusersError, match=r"shape \[48\]; the text encoder of .* takes width 32"):
        DiffusersModel(tiny["spec"], embeddings=[str(wide)])
    with pytest.raises(ValueError, match="embedding=run:<id> names a personalize run"):
        SampleRequest(model=tiny["spec"], prompts=["a"], embedding=["run:abc"])


def test_diffusers_control_is_the_map_or_the_images_canny_edges(tiny, tmp_path):
    """control_is_map: the control image reaches the pipeline unchanged; otherwise its Canny edges
    (the same edges as the project's own ControlNets compute), and the two give other images."""
    from imagegen.sample import SampleRequest, read_parameters, sample
    from imagegen.sample_edit import DiffusersEditPlan
    from models.controlnet import control_map
    from models.diffusers_edit import canny_control

    r = tiny["root"]
    photo = np.zeros((16, 16, 3), np.uint8)
    photo[3:13, 5:11] = (200, 40, 40)  # a red block: edges along its border
    Image.fromarray(photo).save(tmp_path / "photo.png")
    base = dict(model=tiny["spec"], prompts=["a cat"], n=1, steps=3, guidance=2.0, controlnet=str(tiny["cn"]))
    as_map = DiffusersEditPlan(SampleRequest(**base, control=str(tmp_path / "photo.png"), control_is_map=True))
    assert np.array_equal(np.asarray(as_map.control), photo)
    edged = DiffusersEditPlan(SampleRequest(**base, control=str(tmp_path / "photo.png")))
    got = np.asarray(edged.control)
    assert got.shape == (16, 16, 3) and set(np.unique(got)) == {0, 255}
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = control_map(x, "canny")[0, 0].numpy() > 0
    assert np.array_equal(got[..., 0] > 0, ours) and ours.any()
    assert np.array_equal(np.asarray(canny_control(Image.fromarray(photo))), got)
    a = sample(SampleRequest(**base, control=str(tmp_path / "photo.png"), out=str(tmp_path / "a")), tmp_path / "root")
    b = sample(SampleRequest(**base, control=str(tmp_path / "photo.png"), control_is_map=True, out=str(tmp_path / "b")),
               tmp_path / "root")
    assert a["sample_id"] != b["sample_id"]
    pa = read_parameters(a["files"][0])["control"]
    assert pa["is_map"] is False and pa["signal"] == "canny"
    # the two controls steer the pipeline differently (floats: the tiny model's PNGs can round alike)
    from models import diffusers_edit as E
    from models.hf_diffusers import DiffusersModel

    m = DiffusersModel(tiny["spec"])
    pipe = E.edit_pipeline(m, "sample", E.load_controlnet(tiny["cn"], m))
    z = torch.randn((1, *m.noise_shape), generator=torch.Generator().manual_seed(1))
    outs = [E.generate(m, pipe, "sample", ["a cat"], None, 3, 2.0, torch.Generator().manual_seed(0), control=c,
                       control_scale=1.0, latents=z)[0] for c in (as_map.control, edged.control)]
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


def test_diffusers_height_and_width(tiny, tmp_path):
    """A non-square sample through the real pipeline, its size in the id; bad sides refused before loading."""
    from imagegen.sample import SampleError, SampleRequest, sample
    from models.hf_diffusers import DiffusersModel, vae_factor

    f = vae_factor(tiny["pipe"])
    base = dict(model=tiny["spec"], prompts=["a cat"], n=1, steps=3, guidance=2.0)
    wide = sample(SampleRequest(**base, height=16, width=16 + 4 * f, out=str(tmp_path / "w")), tmp_path / "root")
    im = Image.open(wide["files"][0])
    assert im.size == (16 + 4 * f, 16)
    square = sample(SampleRequest(**base, out=str(tmp_path / "s")), tmp_path / "root")
    assert Image.open(square["files"][0]).size == (16, 16) and square["sample_id"] != wide["sample_id"]
    m = DiffusersModel(tiny["spec"], height=16, width=16 + 4 * f)
    assert m.noise_shape[1:] == (16 // f, (16 + 4 * f) // f)
    if f > 1:
        with pytest.raises(SampleError, match=f"width {16 + f + 1}: not a multiple of .*VAE factor {f}"):
            sample(SampleRequest(**base, width=16 + f + 1), tmp_path / "root")
    with pytest.raises(ValueError, match="resolution= .* or height=/width=, not both"):
        SampleRequest(**base, resolution=16, height=16)
    # editing at that size: the init image must be width x height
    Image.new("RGB", (16 + 4 * f, 16)).save(tmp_path / "wide.png")
    ed = sample(SampleRequest(**base, height=16, width=16 + 4 * f, init_image=str(tmp_path / "wide.png"), strength=0.5,
                              out=str(tmp_path / "e")), tmp_path / "root")
    assert Image.open(ed["files"][0]).size == (16 + 4 * f, 16)
    with pytest.raises(SampleError, match=f"is 16x16, but .* makes {16 + 4 * f}x16"):
        sample(SampleRequest(**base, height=16, width=16 + 4 * f, init_image=str(tiny["root"] / "init.png")),
               tmp_path / "root")
    # evaluation takes the same sides, checked before any work
    from imagegen.evaluate.run import EvalError, EvalRequest, evaluate

    if f > 1:
        with pytest.raises(EvalError, match=f"height {16 + 1}: not a multiple of .*VAE factor {f}"):
            evaluate(EvalRequest(model=tiny["spec"], metrics=["clipscore"], height=17, n_samples=2), tmp_path / "root")
    with pytest.raises(ValueError, match="not both"):
        EvalRequest(model=tiny["spec"], resolution=16, width=32)


def test_control_is_map_reaches_the_controlnet_unchanged_else_canny_runs(tiny, tmp_path):
    """At the ControlNet's own input (its forward's controlnet_cond, [0, 1] RGB after the pipeline's
    control processor): with control_is_map the map image itself, without it the image's Canny
    edges (OpenCV at 100/200); a .npy map is refused for diffusers, naming the file."""
    import cv2

    from imagegen.sample import SampleError, SampleRequest, sample
    from imagegen.sample_edit import DiffusersEditPlan
    from models.hf_diffusers import DiffusersModel

    r = tiny["root"]
    fam = DiffusersModel(tiny["spec"])

    def received(control: Path, is_map: bool) -> np.ndarray:
        req = SampleRequest(model=tiny["spec"], prompts=["a cat"], n=1, steps=2, control=str(control),
                            controlnet=str(tiny["cn"]), control_is_map=is_map)
        plan = DiffusersEditPlan(req)
        seen = []
        hook = plan.pipeline(fam).controlnet.register_forward_pre_hook(
            lambda mod, args, kw: seen.append(kw["controlnet_cond"].detach().clone()), with_kwargs=True)
        try:
            plan.generate(fam, 1, ["a cat"], None, "pipeline", 2, 1.0, torch.randn(1, 4, 8, 8),
                          torch.Generator().manual_seed(0))
        finally:
            hook.remove()
        assert len(seen) == 2  # one ControlNet call per step, each given the same map
        return seen[0][0].permute(1, 2, 0).numpy()

    edges = np.asarray(Image.open(r / "control.png").convert("RGB"))
    assert np.array_equal(received(r / "control.png", True), edges.astype(np.float32) / 255)
    photo = np.asarray(Image.open(r / "init.png").convert("RGB"))
    canny = cv2.Canny(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), 100, 200)
    assert 0 < (canny > 0).mean() < 1
    got = received(r / "init.png", False)
    assert np.array_equal(got, np.repeat(canny[:, :, None], 3, axis=2).astype(np.float32) / 255)
    assert not np.array_equal(received(r / "init.png", True), got)  # as a map, the photo itself goes in

    base = dict(model=tiny["spec"], prompts=["a cat"], n=1, steps=2, control=str(r / "control.png"),
                controlnet=str(tiny["cn"]))
    np.save(tmp_path / "map.npy", np.zeros((3, 16, 16), np.float32))
    with pytest.raises(SampleError, match="map.npy: a diffusers ControlNet takes its map as an image"):
        sample(SampleRequest(**{**base, "control": str(tmp_path / "map.npy")}, control_is_map=True), tmp_path / "root")
