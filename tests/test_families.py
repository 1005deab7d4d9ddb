"""Model families: the contract (models/base.py), DDPM / EDM / flow matching, the registry, the
frozen text encoder, a user-defined family and a two-optimizer family driven by train_step."""

from __future__ import annotations

import statistics
from typing import Any, ClassVar, Mapping

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from models.base import Family, FamilyConfig, LossOut, randn, train_step
from models.ddpm import DDPM
from models.edm import EDM
from models.flow import FlowMatching
from models.registry import FAMILIES, build_family, get_family, register_family
from models.samplers import SampleResult
from models.text import get_text_encoder

from _helpers import tiny_random_clip


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory) -> str:
    """A tiny random open_clip CLIP saved as a local-dir (config + safetensors); never downloads."""
    return tiny_random_clip(tmp_path_factory.mktemp("tiny_clip"), context_length=16)


SIZE = 16
SMALL_UNET = dict(model_channels=16, norm_groups=8, head_channels=16)
NETS = {"ddpm": ("unet", SMALL_UNET), "edm": ("unet", SMALL_UNET), "flow": ("dit", {})}
COMBOS = [(f, c) for f in ("ddpm", "edm", "flow") for c in ("none", "class", "text")]
# training ddpm/edm models (the `trained` fixture) takes ~8 s each on 2 shared cores: the tests that
# need one are outside the fast tier; flow keeps every trained check in it
SLOW_TRAINED = ("ddpm", "edm")
TRAINED_COMBOS = [pytest.param(f, c, marks=pytest.mark.slow) if f in SLOW_TRAINED else (f, c) for f, c in COMBOS]
TRAINED_FAMILIES = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_TRAINED else f for f in ("ddpm", "edm", "flow")]
CAPTIONS = ["a red square", "a blue square"]


def _cfg(family: str, cond: str, clip_spec: str, **extra: Any) -> dict[str, Any]:
    net, overrides = NETS[family]
    cfg: dict[str, Any] = dict(net=net, net_size="tiny", net_overrides=overrides, image_size=SIZE,
                               conditioning=cond)
    if cond == "class":
        cfg["num_classes"] = 2
    if cond == "text":
        cfg["text_encoder"] = clip_spec
    return {**cfg, **extra}


def _data() -> dict[str, Any]:
    """16 images of two solid colours with their labels and captions."""
    x = torch.zeros(16, 3, SIZE, SIZE)
    x[:8, 0], x[:8, 1], x[:8, 2] = 0.8, -0.5, -0.6
    x[8:, 0], x[8:, 1], x[8:, 2] = -0.7, -0.2, 0.9
    labels = torch.tensor([0] * 8 + [1] * 8)
    return {"image": x, "label": labels, "caption": [CAPTIONS[int(y)] for y in labels]}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def trained(clip_spec):
    """Each (family, conditioning) trained 30 Adam steps once; tests share the results."""
    cache: dict[tuple[str, str], tuple[Family, list[float]]] = {}

    def get(family: str, cond: str) -> tuple[Family, list[float]]:
        if (family, cond) not in cache:
            torch.manual_seed(0)
            model = build_family(family, _cfg(family, cond, clip_spec))
            opts = {"model": torch.optim.Adam(model.optimizers_spec()["model"], lr=3e-3)}
            g, batch = _gen(1), _data()
            losses = [train_step(model, opts, batch, g).logs["loss"] for _ in range(30)]
            cache[(family, cond)] = (model, losses)
        return cache[(family, cond)]

    return get


# ----------------------------------------------------------------------------- every family x condition


@pytest.mark.parametrize("family,cond", COMBOS)
def test_loss_is_finite_scalar_with_grads_everywhere(family: str, cond: str, clip_spec: str) -> None:
    model = build_family(family, _cfg(family, cond, clip_spec))
    spec = model.optimizers_spec()
    assert list(spec) == ["model"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in spec["model"]} == {id(p) for p in trainable}
    # The frozen text tower is not part of the family: only the net's parameters are trained/saved.
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in model.net.parameters())
    assert all(k.startswith("net.") for k in model.state_dict())
    out = model.loss(_data(), _gen(0))
    loss = out.losses["model"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert out.logs["loss"] == pytest.approx(loss.item())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in trainable)


@pytest.mark.parametrize("family,cond", TRAINED_COMBOS)
def test_training_lowers_the_loss(family: str, cond: str, trained) -> None:
    _, losses = trained(family, cond)
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < 0.9 * first, f"{family}/{cond}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("family,cond", TRAINED_COMBOS)
def test_every_sampler_gives_images_in_range(family: str, cond: str, trained) -> None:
    model, _ = trained(family, cond)
    conditioning = {"none": None, "class": [0, 1, 1], "text": [CAPTIONS[0], CAPTIONS[1], "x"]}[cond]
    steps = 3
    expected_nfe = {"ddpm": steps, "ddim": steps, "euler": steps, "dpmpp_2m": steps,
                    "heun": 2 * steps - 1 if family == "edm" else 2 * steps}
    for sampler in model.samplers:
        res = model.sample_result(3, conditioning, sampler=sampler, steps=steps, generator=_gen(2))
        assert isinstance(res, SampleResult)
        x = res.sample
        assert x.shape == (3, 3, SIZE, SIZE) and torch.isfinite(x).all()
        assert x.min() >= -1 and x.max() <= 1
        assert res.nfe == expected_nfe[sampler], sampler
    assert model.training  # sampling restores train mode


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_class_guidance_changes_samples(family: str, trained) -> None:
    model, _ = trained(family, "class")
    x_T = randn((4, 3, SIZE, SIZE), _gen(3), "cpu")
    labels = [0, 1, 0, 1]
    plain = model.sample(4, labels, steps=4, x_T=x_T)
    again = model.sample(4, labels, steps=4, x_T=x_T)
    guided = model.sample_result(4, labels, steps=4, guidance=3.0, x_T=x_T)
    torch.testing.assert_close(plain, again)  # deterministic default samplers
    assert (guided.sample - plain).abs().max() > 1e-3
    assert guided.nfe == model.sample_result(4, labels, steps=4, x_T=x_T).nfe  # CFG = doubled batch, not calls
    # A negative label replaces the null branch: again a different result.
    neg = model.sample(4, labels, steps=4, guidance=3.0, negative=[1, 0, 1, 0], x_T=x_T)
    assert (neg - guided.sample).abs().max() > 1e-3


def test_text_guidance_and_negative_prompt(trained) -> None:
    model, _ = trained("flow", "text")
    x_T = randn((2, 3, SIZE, SIZE), _gen(4), "cpu")
    plain = model.sample(2, CAPTIONS, steps=4, x_T=x_T)
    guided = model.sample(2, CAPTIONS, steps=4, guidance=4.0, x_T=x_T)
    negative = model.sample(2, CAPTIONS, steps=4, guidance=4.0, negative="a green circle", x_T=x_T)
    assert (guided - plain).abs().max() > 1e-3
    assert (negative - guided).abs().max() > 1e-3
    # The empty prompt IS the null condition: as a negative it changes nothing.
    same = model.sample(2, CAPTIONS, steps=4, guidance=4.0, negative="", x_T=x_T)
    torch.testing.assert_close(same, guided)


@pytest.mark.slow  # trains a ddpm/edm model (SLOW_TRAINED)
def test_samples_are_reproducible_from_the_generator(trained) -> None:
    model, _ = trained("ddpm", "none")
    a = model.sample(2, sampler="ddpm", steps=5, generator=_gen(5))
    b = model.sample(2, sampler="ddpm", steps=5, generator=_gen(5))
    c = model.sample(2, sampler="ddpm", steps=5, generator=_gen(6))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    x_T = randn((2, 3, SIZE, SIZE), _gen(7), "cpu")
    d0 = model.sample(2, sampler="ddim", steps=5, x_T=x_T, generator=_gen(8))
    d1 = model.sample(2, sampler="ddim", steps=5, x_T=x_T, generator=_gen(8), eta=1.0)
    assert (d0 - d1).abs().max() > 1e-3  # eta as a sample() option


def test_family_options_are_used(clip_spec: str) -> None:
    v = build_family("ddpm", _cfg("ddpm", "none", clip_spec, prediction="v", schedule="cosine"))
    assert isinstance(v, DDPM) and v.alphas_cumprod.dtype == torch.float64
    assert v.alphas_cumprod[-1] < 1e-4  # cosine reaches ~pure noise at T-1
    assert v.loss(_data(), _gen(0)).losses["model"].isfinite()
    # A fresh (zero-output) eps network's loss is E|eps|^2 = 1: the target is the noise.
    eps = build_family("ddpm", _cfg("ddpm", "none", clip_spec))
    assert eps.loss(_data(), _gen(0)).losses["model"].item() == pytest.approx(1.0, abs=0.1)
    flow = build_family("flow", _cfg("flow", "none", clip_spec, t_sampling="uniform"))
    assert flow.cfg.net == "dit" and isinstance(flow, FlowMatching)


@pytest.mark.slow  # trains a ddpm/edm model (SLOW_TRAINED)
def test_edm_loss_is_lambda_weighted_denoiser_error_and_churn_is_used(trained) -> None:
    from models.diffusion import edm_denoiser, edm_loss_weight, sample_sigma_lognormal

    model, _ = trained("edm", "none")
    x0 = _data()["image"]
    got = model.loss({"image": x0}, _gen(0)).losses["model"]
    g = _gen(0)  # same draws in the same order: sigma, then noise
    sigma = sample_sigma_lognormal(16, model.cfg.p_mean, model.cfg.p_std, g)
    noise = randn(x0.shape, g, "cpu")
    D = edm_denoiser(lambda x, c: model.net(x, c, {}), model.cfg.sigma_data)
    x = x0 + sigma.float().view(-1, 1, 1, 1) * noise
    w = edm_loss_weight(sigma, model.cfg.sigma_data).float().view(-1, 1, 1, 1)
    want = (w * (D(x, sigma) - x0) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    x_T = randn((2, 3, SIZE, SIZE), _gen(9), "cpu")
    det = model.sample(2, steps=4, x_T=x_T, generator=_gen(1))
    churn = model.sample(2, steps=4, x_T=x_T, generator=_gen(1), s_churn=5.0)
    assert (det - churn).abs().max() > 1e-3


def test_condition_dropout_uses_the_null_condition(clip_spec: str) -> None:
    model = build_family("flow", _cfg("flow", "text", clip_spec, cond_dropout=0.5))
    batch = _data()
    cond = model.encode_condition(batch)
    assert set(cond) == {"pooled", "tokens", "token_mask"}
    dropped = model.drop_condition(cond, _gen(0))
    null = model.null_condition(16)
    is_null = [bool(torch.equal(dropped["pooled"][i], null["pooled"][i])) for i in range(16)]
    assert 0 < sum(is_null) < 16
    for i, z in enumerate(is_null):
        src = null if z else cond
        for k in cond:
            assert torch.equal(dropped[k][i], src[k][i]), (i, k)
    labels = build_family("ddpm", _cfg("ddpm", "class", clip_spec, cond_dropout=0.5))
    y = labels.drop_condition(labels.encode_condition(batch), _gen(0))["class"]
    assert set(y.tolist()) <= {0, 1, 2} and 2 in y.tolist() and (y != 2).any()  # 2 = null index
    never = build_family("ddpm", _cfg("ddpm", "class", clip_spec, cond_dropout=0.0))
    assert torch.equal(never.training_condition(batch, _gen(0))["class"], batch["label"])


# ----------------------------------------------------------------------------- text encoder


def test_text_encoder_matches_open_clip(clip_spec: str) -> None:
    enc = get_text_encoder(clip_spec)
    assert get_text_encoder(clip_spec) is enc  # cached per spec and device
    out = enc(["a red square", "", "a much longer caption about a blue circle"])
    assert out.tokens.shape == (3, enc.context_length, enc.dim) and out.pooled.shape == (3, enc.dim)
    ids = enc.clip.tokenizer(["a red square", "", "a much longer caption about a blue circle"])
    with torch.no_grad():
        ref = enc.clip.model.encode_text(ids)
    torch.testing.assert_close(out.pooled, ref.float())
    # mask keeps start .. end token: 2 tokens for the empty prompt, more for longer captions
    assert out.mask[1].sum() == 2 and out.mask[0].sum() < out.mask[2].sum()
    assert out.mask[:, 0].all() and not out.mask[:, -1].any()
    with pytest.raises(TypeError, match="list of captions"):
        enc("just a string")
    with pytest.raises(TypeError, match="caption 1"):
        enc(["ok", 3])


# ----------------------------------------------------------------------------- errors


@pytest.mark.slow  # trains a ddpm/edm model (SLOW_TRAINED)
def test_sampling_errors(trained) -> None:
    model, _ = trained("edm", "none")
    with pytest.raises(ValueError, match=r"unknown sampler 'ddim'.*\['heun', 'euler', 'dpmpp_2m'\]"):
        model.sample(1, sampler="ddim")
    with pytest.raises(ValueError, match="guidance=2.0 needs a conditional model"):
        model.sample(1, guidance=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(1, conditioning=[0])
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['eta'\]"):
        model.sample(1, sampler="heun", eta=0.5)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        model.sample(1, steps=0)
    with pytest.raises(ValueError, match="x_T must have shape"):
        model.sample(2, x_T=torch.zeros(1, 3, SIZE, SIZE))
    cls, _ = trained("ddpm", "class")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        cls.sample(2, [0, 2])
    with pytest.raises(ValueError, match="labels must be 2 integers"):
        cls.sample(2, [0, 1, 1])
    with pytest.raises(ValueError, match="guidance=3.0 needs conditioning"):
        cls.sample(2, guidance=3.0)
    with pytest.raises(ValueError, match="guidance must be a number >= 0"):
        cls.sample(2, [0, 1], guidance=-1.0)
    txt, _ = trained("flow", "text")
    with pytest.raises(ValueError, match="captions must be a list of 2 strings"):
        txt.sample(2, ["only one"])


@pytest.mark.slow  # trains a ddpm/edm model (SLOW_TRAINED)
def test_bad_batches_are_refused(trained) -> None:
    model, _ = trained("ddpm", "class")
    data = _data()
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        model.loss({**data, "image": data["image"] * 255})
    with pytest.raises(ValueError, match=r"float tensor \[B, 3, 16, 16\]"):
        model.loss({**data, "image": data["image"][:, :1]})
    with pytest.raises(ValueError, match=r"needs batch\['label'\]"):
        model.loss({"image": data["image"]})
    with pytest.raises(ValueError, match="with an 'image' tensor"):
        model.loss({"label": data["label"]})


@pytest.mark.parametrize(
    "family,cfg,message",
    [
        ("ddpm", dict(conditioning="class"), "needs num_classes >= 1"),
        ("ddpm", dict(num_classes=3), "only used with conditioning='class'"),
        ("ddpm", dict(conditioning="text"), "needs text_encoder"),
        ("ddpm", dict(cond_dropout=1.0), "cond_dropout"),
        ("ddpm", dict(prediction="x1"), "prediction"),
        ("ddpm", dict(timesteps=1), "timesteps"),
        ("ddpm", dict(unknown_field=1), "unknown_field"),
        ("ddpm", dict(net="resnet"), "net"),
        ("ddpm", dict(net_overrides=dict(depht=3)), "depht"),
        ("ddpm", dict(net_overrides=dict(image_size=64)), r"may not set \['image_size'\]"),
        ("flow", dict(net_overrides=dict(hidden_size=66)), "divisible"),
        ("edm", dict(sigma_min=5.0, sigma_max=1.0), "sigma_min 5.0 must be < sigma_max"),
        ("flow", dict(t_sampling="beta"), "t_sampling"),
    ],
)
def test_bad_configs_are_refused(family: str, cfg: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        get_family(family).Config(**cfg)


def test_family_refuses_wrong_config_type() -> None:
    with pytest.raises(TypeError, match="needs a DDPMConfig"):
        DDPM(FamilyConfig())


# ----------------------------------------------------------------------------- registry


def test_registry_lookup_and_errors() -> None:
    assert get_family("ddpm") is DDPM and get_family("edm") is EDM and get_family("flow") is FlowMatching
    with pytest.raises(KeyError, match=r"unknown model family 'stylegan'; registered: \[.*'ddpm'.*'edm'"):
        get_family("stylegan")
    with pytest.raises(TypeError, match="subclass of models.base.Family"):
        register_family(nn.Linear)  # type: ignore[arg-type]

    class NoName(DDPM):
        name = ""

    with pytest.raises(ValueError, match="set the class attribute `name`"):
        register_family(NoName)

    class Clash(DDPM):
        pass

    with pytest.raises(ValueError, match="'ddpm' is already taken"):
        register_family(Clash)

    class BadDefault(DDPM):
        name = "bad_default"
        default_sampler = "plms"

    with pytest.raises(ValueError, match="contain default_sampler 'plms'"):
        register_family(BadDefault)
    assert register_family(DDPM) is DDPM  # re-registering the same class is a no-op
    assert "bad_default" not in FAMILIES


# ----------------------------------------------------------------------------- user-defined families


class OneStepConfig(FamilyConfig):
    noise: float = 0.5


class OneStep(Family):
    """What a user writes: a one-step x0 denoiser at a fixed noise level, on the U-Net."""

    name: ClassVar[str] = "test_one_step"
    Config: ClassVar[type[FamilyConfig]] = OneStepConfig
    samplers: ClassVar[tuple[str, ...]] = ("one_step",)
    default_sampler: ClassVar[str] = "one_step"
    default_steps: ClassVar[int] = 1
    conditioning: ClassVar[frozenset[str]] = frozenset({"none", "class"})

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.net = self.build_denoiser()

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x0 = self.check_images(batch)
        x = x0 + self.cfg.noise * randn(x0.shape, generator, x0.device)
        t = torch.zeros(x0.shape[0])
        loss = F.mse_loss(self.net(x, t, self.training_condition(batch, generator)), x0)
        return LossOut({"model": loss}, {"loss": loss.item()})

    def run_sampler(self, net_fn, x_T, sampler, steps, generator, options) -> SampleResult:
        return SampleResult(net_fn(x_T * self.cfg.noise, torch.zeros(x_T.shape[0])), 1)


@pytest.fixture
def user_family():
    register_family(OneStep)
    yield OneStep
    FAMILIES.pop(OneStep.name, None)


def test_user_defined_family_trains_and_samples(user_family) -> None:
    torch.manual_seed(0)
    model = build_family("test_one_step", dict(net_size="tiny", image_size=SIZE, conditioning="class",
                                               num_classes=2, net_overrides=SMALL_UNET))
    opts = {"model": torch.optim.Adam(model.parameters(), lr=3e-3)}
    g = _gen(0)
    losses = [train_step(model, opts, _data(), g).logs["loss"] for _ in range(12)]
    assert statistics.mean(losses[-3:]) < 0.9 * statistics.mean(losses[:3])
    x = model.sample(2, [0, 1], guidance=2.0, generator=g)
    assert x.shape == (2, 3, SIZE, SIZE) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="conditioning 'text' is not supported"):
        OneStep(dict(conditioning="text", text_encoder="local-dir:/nowhere"))


def test_two_optimizer_family_steps_both() -> None:
    torch.manual_seed(0)
    from user_families import PixelGAN  # what a user writes: a small GAN with two optimizers

    gan = PixelGAN(dict(image_size=8, latent_dim=8, hidden=32))
    spec = gan.optimizers_spec()
    opts = {k: torch.optim.SGD(v, lr=0.1) for k, v in spec.items()}
    batch = {"image": torch.rand(4, 3, 8, 8) * 2 - 1}
    # Expected gradients: each loss differentiated w.r.t. its own optimizer's parameters only.
    out = gan.loss(batch, _gen(0))
    want_g = torch.autograd.grad(out.losses["generator"], spec["generator"], retain_graph=True)
    want_d = torch.autograd.grad(out.losses["discriminator"], spec["discriminator"])
    before = {k: [p.detach().clone() for p in v] for k, v in spec.items()}
    torch.testing.assert_close(gan(batch, _gen(0)).losses["generator"], out.losses["generator"])  # forward = loss
    got = train_step(gan, opts, batch, _gen(0))
    assert set(got.losses) == {"generator", "discriminator"}
    for name, want in (("generator", want_g), ("discriminator", want_d)):
        for p, w, b in zip(spec[name], want, before[name]):
            torch.testing.assert_close(p.grad, w)  # no cross-talk between the two losses
            torch.testing.assert_close(p.detach(), b - 0.1 * w)  # and every optimizer stepped
    assert gan.sample(3, generator=_gen(1)).shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="must be the same"):
        train_step(gan, {"generator": opts["generator"]}, batch)


def test_family_by_module_reference() -> None:
    from models.registry import get_family

    cls = get_family("user_families:PixelGAN")
    assert cls.__name__ == "PixelGAN" and get_family("user_pixel_gan") is cls
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        get_family("no_such_module:Thing")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        get_family("user_families:Nope")
    # a refusal of user input like the others (exit 2 in the CLI), naming what the object is
    with pytest.raises(ValueError, match="PixelGANConfig is ModelMetaclass .* not a subclass of models.base.Family"):
        get_family("user_families:PixelGANConfig")
