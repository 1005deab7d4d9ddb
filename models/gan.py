"""GANs on the family contract: DCGAN-style generator and discriminator (Radford et al. 2016),
the non-saturating loss (Goodfellow et al. 2014) or WGAN-GP (Gulrajani et al. 2017), R1
regularisation (Mescheder et al. 2018) with lazy application, optional spectral norm on the
discriminator (Miyato et al. 2018), class conditioning through a projection discriminator
(Miyato & Koyama 2018), and a D:G update ratio.

Two optimizers, ``generator`` and ``discriminator``; ``loss`` returns both (the discriminator's
on detached fakes, so backward-all-then-step-all in the trainer is exact).  With ``d_steps = k``
the generator updates on one step in k (``optimizers_for_step``).  R1 is computed on every
``r1_every``-th training step and scaled by ``r1_every`` (StyleGAN2's lazy
regularisation); a step counter in the state_dict keeps resume exact.  Logged: D(real), D(fake),
R1 / gradient penalty, and a mode-collapse indicator: the mean pairwise distance of the batch's
fakes over that of its real images (about 1 when fakes are as diverse as the data, near 0 when
the generator collapses).  The trainer's EMA of the weights gives the EMA generator the samples
come from.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from imagegen.checks import Problems
from models.base import Family, FamilyConfig, LossOut, rand, randn
from models.samplers import SampleResult


class GANConfig(FamilyConfig):
    builds_denoiser: ClassVar[bool] = False

    loss_type: Literal["nonsaturating", "wgan_gp"] = Field("nonsaturating", description="Adversarial loss")
    latent_dim: int = Field(64, ge=1, le=4096, description="Dimension of the generator's Gaussian input")
    width: int = Field(32, ge=4, le=2048, description="Channels at the highest resolution (doubling down)")
    levels: int = Field(2, ge=1, le=7, description="Upsampling levels: image_size = base side * 2^levels")
    r1_gamma: float = Field(0.0, ge=0.0, le=1e4, description="R1 penalty weight gamma (0 = off)")
    r1_every: int = Field(1, ge=1, le=1000, description="Apply R1 every k training steps (lazy)")
    gp_lambda: float = Field(10.0, ge=0.0, le=1e4, description="WGAN-GP gradient-penalty weight")
    spectral_norm: bool = Field(False, description="Spectral norm on the discriminator's layers")
    d_steps: int = Field(1, ge=1, le=100, description="Discriminator updates per generator update")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("image_size", "levels") and self.image_size % (2 ** self.levels):
            p.add(f"image_size {self.image_size} is not divisible by 2^levels = {2 ** self.levels}")
        if p.can("conditioning") and self.conditioning == "text":
            p.add("conditioning is 'none' or 'class' (projection discriminator)")


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, min(8, c // 4)), c)


class Generator(nn.Module):
    def __init__(self, c: GANConfig) -> None:
        super().__init__()
        self.base = c.image_size // 2 ** c.levels
        self.top = c.width * 2 ** c.levels
        self.embed = nn.Embedding(c.num_classes, c.latent_dim) if c.conditioning == "class" else None
        self.fc = nn.Linear(c.latent_dim, self.top * self.base * self.base)
        layers: list[nn.Module] = [_gn(self.top), nn.ReLU()]
        w = self.top
        for _ in range(c.levels):
            layers += [nn.ConvTranspose2d(w, w // 2, 4, stride=2, padding=1), _gn(w // 2), nn.ReLU()]
            w //= 2
        layers += [nn.Conv2d(w, c.channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor, y: Tensor | None) -> Tensor:
        if self.embed is not None and y is not None:
            z = z * self.embed(y)  # multiplicative class conditioning of the latent
        h = self.fc(z).view(z.shape[0], self.top, self.base, self.base)
        return self.body(h)


class Discriminator(nn.Module):
    def __init__(self, c: GANConfig) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if c.spectral_norm else (lambda m: m)
        layers: list[nn.Module] = [sn(nn.Conv2d(c.channels, c.width, 3, padding=1)), nn.LeakyReLU(0.2)]
        w = c.width
        for _ in range(c.levels):
            layers += [sn(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            w *= 2
        self.body = nn.Sequential(*layers)
        self.out = sn(nn.Linear(w, 1))
        self.project = sn(nn.Embedding(c.num_classes, w)) if c.conditioning == "class" else None

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        h = self.body(x).sum(dim=(2, 3))  # global sum pooling
        out = self.out(h).squeeze(1)
        if self.project is not None and y is not None:
            out = out + (self.project(y) * h).sum(dim=1)  # projection discriminator
        return out


def _pairwise(x: Tensor) -> Tensor:
    f = x.float().flatten(1)
    d = torch.cdist(f, f)
    n = f.shape[0]
    return d.sum() / max(1, n * (n - 1))


class GAN(Family):
    name: ClassVar[str] = "gan"
    Config: ClassVar[type[FamilyConfig]] = GANConfig
    samplers: ClassVar[tuple[str, ...]] = ("generate",)
    default_sampler: ClassVar[str] = "generate"
    default_steps: ClassVar[int] = 1
    conditioning: ClassVar[frozenset[str]] = frozenset({"none", "class"})

    cfg: GANConfig

    def __init__(self, cfg: GANConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.generator = Generator(self.cfg)
        self.discriminator = Discriminator(self.cfg)
        self.register_buffer("d_calls", torch.zeros((), dtype=torch.long))  # steps taken (lazy R1), checkpointed

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.cfg.latent_dim,)

    def optimizers_spec(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": list(self.generator.parameters()),
                "discriminator": list(self.discriminator.parameters())}

    def optimizers_for_step(self, step: int) -> list[str]:
        k = self.cfg.d_steps
        return ["generator", "discriminator"] if step % k == k - 1 else ["discriminator"]

    @torch.no_grad()
    def after_step(self) -> None:
        self.d_calls += 1  # counts optimizer steps: lazy R1 falls on the same steps for any process layout

    def _batch_labels(self, batch: Mapping[str, Any]) -> Tensor | None:
        if self.cfg.conditioning != "class":
            return None
        return self.encode_condition(batch)["class"]

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        c = self.cfg
        real = self.check_images(batch)
        n, dev = real.shape[0], real.device
        y = self._batch_labels(batch)
        fake = self.generator(randn((n, c.latent_dim), generator, dev, real.dtype), y)
        logs: dict[str, float] = {}
        lazy_r1 = c.r1_gamma > 0 and int(self.d_calls) % c.r1_every == 0
        if lazy_r1:
            real = real.detach().requires_grad_(True)
        d_real = self.discriminator(real, y)
        d_fake = self.discriminator(fake.detach(), y)
        if c.loss_type == "nonsaturating":
            d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
            g_loss = F.softplus(-self.discriminator(fake, y)).mean()
        else:
            eps = rand(n, generator, dev).view(-1, 1, 1, 1).to(real.dtype)
            mix = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
            grad, = torch.autograd.grad(self.discriminator(mix, y).sum(), mix, create_graph=True)
            gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
            d_loss = d_fake.mean() - d_real.mean() + c.gp_lambda * gp
            g_loss = -self.discriminator(fake, y).mean()
            logs["gp"] = float(gp.detach())
        if lazy_r1:
            grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            r1 = grad.flatten(1).pow(2).sum(1).mean()
            d_loss = d_loss + 0.5 * c.r1_gamma * c.r1_every * r1
            logs["r1"] = float(r1.detach())
        with torch.no_grad():
            diversity = float(_pairwise(fake) / _pairwise(real).clamp(min=1e-8)) if n > 1 else float("nan")
        logs.update(d_real=float(d_real.mean().detach()), d_fake=float(d_fake.mean().detach()), diversity=diversity)
        return LossOut({"generator": g_loss, "discriminator": d_loss}, logs)

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """One generator pass from z ~ N(0, I) (``x_T``: [n, latent_dim]); class labels for a
        conditional GAN.  No guidance: a GAN has no unconditional branch to extrapolate from."""
        self._check_sampling(sampler, steps, guidance, conditioning, negative, options)
        if guidance != 1.0:
            raise ValueError(f"GAN.sample: guidance={guidance}: a GAN samples in one pass without guidance")
        y = None
        if self.cfg.conditioning == "class":
            y = (self.condition_from(conditioning, n, "GAN.sample")["class"] if conditioning is not None
                 else torch.randint(0, self.cfg.num_classes, (n,), generator=generator).to(self.device))
        if x_T is None:
            x_T = randn((n, self.cfg.latent_dim), generator, self.device)
        elif tuple(x_T.shape) != (n, self.cfg.latent_dim):
            raise ValueError(f"GAN.sample: x_T must have shape {(n, self.cfg.latent_dim)}, got {tuple(x_T.shape)}")
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                x = self.generator(x_T.to(self.device), y).clamp(-1, 1)
        finally:
            self.train(was)
        return SampleResult(x, 1)
