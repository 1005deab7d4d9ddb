"""Families a user would write in their own module, for tests that reach them by
``"user_families:ClassName"`` (also from torchrun ranks, which import this file themselves)."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Family, FamilyConfig, LossOut, randn
from models.samplers import SampleResult


class PixelGANConfig(FamilyConfig):
    builds_denoiser: ClassVar[bool] = False  # no U-Net/DiT
    latent_dim: int = 16
    hidden: int = 64


class PixelGAN(Family):
    """A small MLP GAN on pixels: two optimizers (generator, discriminator), non-saturating loss
    (Goodfellow et al. 2014), the discriminator on detached fakes."""

    name: ClassVar[str] = "user_pixel_gan"
    Config: ClassVar[type[FamilyConfig]] = PixelGANConfig
    samplers: ClassVar[tuple[str, ...]] = ("generate",)
    default_sampler: ClassVar[str] = "generate"
    default_steps: ClassVar[int] = 1
    conditioning: ClassVar[frozenset[str]] = frozenset({"none"})

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        d = c.channels * c.image_size ** 2
        self.generator = nn.Sequential(nn.Linear(c.latent_dim, c.hidden), nn.ReLU(), nn.Linear(c.hidden, d),
                                       nn.Tanh())
        self.discriminator = nn.Sequential(nn.Linear(d, c.hidden), nn.LeakyReLU(0.2), nn.Linear(c.hidden, 1))

    def optimizers_spec(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": list(self.generator.parameters()),
                "discriminator": list(self.discriminator.parameters())}

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        real = self.check_images(batch).flatten(1)
        fake = self.generator(randn((real.shape[0], self.cfg.latent_dim), generator, real.device))
        d_loss = F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake.detach())).mean()
        g_loss = F.softplus(-self.discriminator(fake)).mean()
        return LossOut({"generator": g_loss, "discriminator": d_loss},
                       {"d_real": float(self.discriminator(real).mean().detach())})

    def sample_result(self, n: int, *args: Any, generator: torch.Generator | None = None, **kw: Any) -> SampleResult:
        with torch.no_grad():
            z = randn((n, self.cfg.latent_dim), generator, self.device)
            x = self.generator(z).view(n, self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        return SampleResult(x, 1)
