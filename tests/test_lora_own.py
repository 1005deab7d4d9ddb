"""LoRA on the project's own nets through peft (models/lora.py), textual inversion and DreamBooth
(models/personalize.py): identity at injection, merge/unmerge round trip, the peft adapter folder
(read back by peft itself), only the adapter / the new embedding trains, and fine-tuning on a new
world subject beats the base, with prior preservation limiting the drift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import random_family as family
from models.base import train_step
from models.lora import LoraError, add_lora, load_lora, merge_lora, save_lora, trainable_fraction, unmerge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET = {"net": "unet", "net_size": "tiny", "image_size": 16,
        "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}
DIT = {"net": "dit", "net_size": "tiny", "image_size": 16}



def inputs(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand((n, 3, 16, 16), generator=g) * 2 - 1, torch.rand(n, generator=g)


@pytest.mark.parametrize("net", [UNET, DIT])
def test_lora_identity_merge_unmerge_and_the_peft_folder(tmp_path, net):
    from peft import PeftModel

    fam, (x, t) = family("flow", net), inputs()
    base_w = {k: v.clone() for k, v in fam.net.state_dict().items()}
    with torch.no_grad():
        ref = fam.net(x, t, {})
    params = add_lora(fam, rank=4)
    assert params and all(p.requires_grad for p in params)
    assert {id(p) for p in fam.optimizers_spec()["model"]} == {id(p) for p in params}  # only the adapter trains
    with torch.no_grad():
        assert torch.equal(fam.net(x, t, {}), ref)  # B = 0 at injection
        for p in params:
            p.normal_(0, 0.1)
        adapted = fam.net(x, t, {})
        assert (adapted - ref).abs().max() > 1e-3
        merge_lora(fam)
        merged = fam.net(x, t, {})
        unmerge_lora(fam)
        back = fam.net(x, t, {})
    assert torch.allclose(merged, adapted, atol=1e-5) and torch.allclose(back, adapted, atol=1e-5)
    for k, v in fam.net.state_dict().items():  # the base weights are restored after unmerge
        key = k.replace(".base_layer", "")
        if "lora_" not in k:
            assert torch.allclose(v, base_w[key], atol=1e-6), k
    folder = save_lora(fam, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = family("flow", net)
    load_lora(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh.net(x, t, {}), adapted)
        via_peft = PeftModel.from_pretrained(family("flow", net).net, str(folder))  # peft reads our folder
        assert torch.allclose(via_peft(x, t, {}), adapted, atol=1e-5)
    with pytest.raises(LoraError, match="does not fit|peft found no module"):
        load_lora(family("flow", DIT if net is UNET else UNET), folder)
    with pytest.raises(LoraError, match="already has LoRA"):
        add_lora(fresh, 2)
    with pytest.raises(LoraError, match="rank must be a positive int"):
        add_lora(family("flow", net), 0)


def test_lora_trains_only_the_adapter_with_the_generic_step():
    fam = family("ddpm", UNET, cond_dropout=0.0)
    add_lora(fam, rank=4)
    assert trainable_fraction(fam) < 0.05
    wide = family("ddpm", UNET)
    add_lora(wide, rank=4, targets="all")  # + the U-Net's convolutions
    assert any("conv1.lora_A" in k for k in wide.state_dict()) and trainable_fraction(wide) > trainable_fraction(fam)
    frozen = {k: v.clone() for k, v in fam.state_dict().items() if "lora_" not in k}
    opt = {"model": torch.optim.AdamW(fam.optimizers_spec()["model"], lr=1e-2)}
    x, _ = inputs(4)
    fam.train()
    for i in range(3):
        train_step(fam, opt, {"image": x}, torch.Generator().manual_seed(i))
    sd = fam.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in frozen.items())
    assert any(float(v.abs().sum()) > 0 for k, v in sd.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    from _helpers import tiny_random_clip

    return tiny_random_clip(tmp_path_factory.mktemp("clip"))


def test_textual_inversion_changes_only_the_new_embedding(clip_spec, tmp_path):
    from models.personalize import TextualInversion, denoising_loss, train_textual_inversion
    from models.text import get_text_encoder

    fam = family("flow", UNET, conditioning="text", text_encoder=clip_spec, cond_dropout=0.0)
    enc = get_text_encoder(clip_spec)
    clip_before = {k: v.clone() for k, v in enc.clip.model.state_dict().items()}
    net_before = {k: v.clone() for k, v in fam.state_dict().items()}
    ti = TextualInversion(clip_spec, "sks", init_word="circle")
    start = ti.embedding.detach().clone()
    plain = ["a red circle", "two blue squares"]
    same = ti.encode(plain)
    assert torch.allclose(same.pooled, enc(plain).pooled, atol=1e-5)  # no placeholder: the frozen features
    x = _subject_images(6)
    caption = "a sks circle"
    before = None
    with ti.active(fam):
        before = denoising_loss(fam, x, caption)
    losses = train_textual_inversion(fam, ti, x, caption, steps=30, lr=5e-2)
    with ti.active(fam):
        after = denoising_loss(fam, x, caption)
    assert after < before, (before, after)
    assert (ti.embedding - start).abs().max() > 1e-3
    assert all(torch.equal(v, clip_before[k]) for k, v in enc.clip.model.state_dict().items())
    assert all(torch.equal(v, net_before[k]) for k, v in fam.state_dict().items())
    assert torch.allclose(ti.encode(plain).pooled, same.pooled)  # other prompts unchanged
    assert len(losses) == 30
    path = ti.save(tmp_path)
    back = TextualInversion.load(path, clip_spec)
    assert back.placeholder == "sks" and torch.equal(back.embedding, ti.embedding)
    with ti.active(fam):  # sampling goes through the embedding too
        s = fam.sample(2, caption, steps=2, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="is 3 tokens"):
        TextualInversion(clip_spec, "<new>")
    with pytest.raises(ValueError, match="does not contain 'sks'"):
        train_textual_inversion(fam, ti, x, "a circle", steps=1)


def _subject_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """A new world 'subject' the base never saw: a striped ring (a textured shape) on gray."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        cy, cx = rng.uniform(5, size - 5, 2)
        r = np.hypot(yy - cy, xx - cx)
        ring = (r > 2.0) & (r < 4.5)
        img = np.full((size, size, 3), 0.0)
        stripes = ((xx + yy) // 2) % 2 == 0
        img[ring & stripes] = (0.9, 0.2, 0.9)
        img[ring & ~stripes] = (0.1, 0.9, 0.3)
        out.append(torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.slow
def test_dreambooth_fits_the_subject_and_prior_preservation_limits_drift():
    from models.personalize import denoising_loss, dreambooth, prior_images

    kw = {"conditioning": "class", "num_classes": 3, "cond_dropout": 0.0}
    subject, label = _subject_images(8), 2
    base = family("flow", UNET, **kw)
    prior = prior_images(base, 2, n=8, steps=4)
    held_subject = _subject_images(6, seed=1)
    results = {}
    for name, opts in [("full", {}), ("full+prior", {"prior": (prior, 2), "prior_weight": 1.0}),
                       ("lora4", {"lora_rank": 4, "lr": 3e-3})]:
        fam = family("flow", UNET, **kw)
        dreambooth(fam, subject, label, steps=40, **{"lr": 1e-3, **opts})
        results[name] = (denoising_loss(fam, held_subject, label), denoising_loss(fam, prior, 2),
                         trainable_fraction(fam) if name == "lora4" else 1.0)
    subject0, prior0 = denoising_loss(base, held_subject, label), denoising_loss(base, prior, 2)
    print({"base": (subject0, prior0), **results})
    for name, (subj, _, _) in results.items():
        assert subj < subject0, (name, subj, subject0)  # every variant learns the new subject
    assert results["full+prior"][1] < results["full"][1]  # prior preservation: less drift on the class
    assert results["lora4"][2] < 0.05


def _random_adapter(net: dict, folder, rank: int, seed: int, targets=None):
    fam = family("flow", net)
    add_lora(fam, rank=rank, alpha=2.0 * rank, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fam.net.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return save_lora(fam, folder)


def test_several_adapters_equal_merging_them_by_hand(tmp_path):
    from safetensors.torch import load_file

    from models.lora import LoraSource, apply_loras, check_lora_fits

    a = _random_adapter(UNET, tmp_path / "a", rank=2, seed=1)
    b = _random_adapter(UNET, tmp_path / "b", rank=3, seed=2, targets=["qkv", "proj"])  # other rank and modules
    (x, t), (sa, sb) = inputs(), (0.7, -1.3)
    fam = family("flow", UNET)
    assert apply_loras(fam, [(a, sa), (b, sb)]) == ["lora0", "lora1"]
    by_hand = family("flow", UNET)
    weights = dict(by_hand.net.named_parameters())
    for folder, scale, rank in ((a, sa, 2), (b, sb, 3)):
        sd = load_file(str(folder / "adapter_model.safetensors"))
        for k in sd:
            if ".lora_A." in k:
                mod = k[len("base_model.model."):].rsplit(".lora_A.", 1)[0]
                down, up = sd[k], sd[k.replace(".lora_A.", ".lora_B.")]
                with torch.no_grad():  # alpha = 2 rank: scale * 2 * B A
                    weights[mod + ".weight"].add_(scale * 2.0 * (up.flatten(1) @ down.flatten(1)).view_as(
                        weights[mod + ".weight"]))
    with torch.no_grad():
        out, ref, base = fam.net(x, t, {}), by_hand.net(x, t, {}), family("flow", UNET).net(x, t, {})
        assert (ref - base).abs().max() > 1e-3  # the adapters act
        assert torch.allclose(out, ref, atol=1e-5)
        zero = family("flow", UNET)
        apply_loras(zero, [(a, 0.0), (b, 0.0)])
        assert torch.equal(zero.net(x, t, {}), base)  # scale 0: the base itself
    # an adapter for another base is named by its first mismatched tensor, from shapes alone
    wide = {**UNET, "net_overrides": {**UNET["net_overrides"], "model_channels": 32}}
    shapes = {n[:-len(".weight")]: tuple(p.shape) for n, p in family("flow", wide).net.named_parameters()
              if n.endswith(".weight")}
    with pytest.raises(LoraError, match=r"shape mismatch: \S+\.lora_A\.weight is \[2, \d+\] in the adapter but "
                                        r"the net needs \[2, \d+\]"):
        check_lora_fits(LoraSource.from_folder(a), shapes, "the net")
    with pytest.raises(LoraError, match="shape"):
        apply_loras(family("flow", wide), [(a, 1.0)])
