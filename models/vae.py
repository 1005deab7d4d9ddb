"""VAE / beta-VAE (Kingma & Welling 2014; Higgins et al. 2017) on the family contract.

A convolutional Gaussian encoder q(z|x) = N(mu(x), diag sigma^2(x)) over a ``latent_channels x
(image_size / 2^levels)^2`` latent grid, the reparameterised sample z = mu + sigma eps, and a
decoder whose mean is the reconstruction.  Loss (per image, averaged over the batch):

    recon + beta * KL(q(z|x) || N(0, I)),   recon = sum over pixels of (x - x_hat)^2 / (2 s^2)

with a fixed Gaussian decoder scale ``s`` (``recon_scale``), so beta = 1 is the ELBO up to a
constant.  Logged separately: the reconstruction term, the KL, and the number of *active* latent
dimensions — dimensions whose posterior mean varies across the batch, Cov_x(E_q[z_d]) > 0.01
(Burda et al. 2016's activity statistic): a posterior-collapse indicator.  Sampling decodes
z ~ N(0, I).  No U-Net/DiT: ``builds_denoiser = False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator
from torch import Tensor, nn

from imagegen.checks import Problems
from models.base import Family, FamilyConfig, LossOut, randn
from models.teacher import loading_for_inference
from models.samplers import SampleResult

ACTIVE_THRESHOLD = 0.01


class VAEConfig(FamilyConfig):
    builds_denoiser: ClassVar[bool] = False

    beta: float = Field(1.0, ge=0.0, le=1000.0, description="Weight of the KL term (1 = ELBO; >1 beta-VAE)")
    latent_channels: int = Field(4, ge=1, le=256, description="Channels of the latent grid")
    levels: int = Field(2, ge=0, le=6, description="Downsampling levels (factor 2 each)")
    width: int = Field(32, ge=4, le=1024, description="Channels of the first level (doubling per level)")
    recon_scale: float = Field(0.1, gt=0.0, le=10.0, description="Decoder std s of the Gaussian likelihood")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("image_size", "levels") and self.image_size % (2 ** self.levels):
            p.add(f"image_size {self.image_size} is not divisible by 2^levels = {2 ** self.levels}")
        if p.can("conditioning") and self.conditioning != "none":
            p.add("the VAE is unconditional (conditioning='none')")


def _block(cin: int, cout: int) -> nn.Sequential:
    g = max(1, min(8, cout // 4))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU())


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [_block(c.channels, c.width)]
        w = c.width
        for _ in range(c.levels):
            layers += [nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), _block(2 * w, 2 * w)]
            w *= 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(w, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.out(self.body(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        w = c.width * 2 ** c.levels
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, w, 3, padding=1), _block(w, w)]
        for _ in range(c.levels):
            layers += [nn.ConvTranspose2d(w, w // 2, 4, stride=2, padding=1), _block(w // 2, w // 2)]
            w //= 2
        layers.append(nn.Conv2d(w, c.channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


class VAE(Family):
    name: ClassVar[str] = "vae"
    Config: ClassVar[type[FamilyConfig]] = VAEConfig
    samplers: ClassVar[tuple[str, ...]] = ("decode",)
    default_sampler: ClassVar[str] = "decode"
    default_steps: ClassVar[int] = 1
    conditioning: ClassVar[frozenset[str]] = frozenset({"none"})

    cfg: VAEConfig

    def __init__(self, cfg: VAEConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return self.latent_shape

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.cfg.image_size // 2 ** self.cfg.levels
        return (self.cfg.latent_channels, s, s)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z|x)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x = self.check_images(batch)
        mu, logvar = self.encode(x)
        z = mu + (0.5 * logvar).exp() * randn(mu.shape, generator, mu.device, mu.dtype)
        x_hat = self.decode(z)
        recon = ((x_hat.float() - x.float()) ** 2).flatten(1).sum(1) / (2 * self.cfg.recon_scale ** 2)
        kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)
        loss = (recon + self.cfg.beta * kl).mean()
        with torch.no_grad():
            active = int((mu.float().flatten(1).var(dim=0) > ACTIVE_THRESHOLD).sum()) if x.shape[0] > 1 else -1
            mse = float(F.mse_loss(x_hat.float(), x.float()))
        return LossOut({"model": loss}, {"recon": float(recon.mean().detach()), "kl": float(kl.mean().detach()),
                                         "active_dims": float(active), "mse": mse})

    def sample_result(self, n: int, conditioning: Any = None, sampler: str | None = None, steps: int | None = None,
                      guidance: float = 1.0, negative: Any = None, generator: torch.Generator | None = None,
                      x_T: Tensor | None = None, **options: Any) -> SampleResult:
        """Decode z ~ N(0, I); ``x_T`` (if given) is the unit Gaussian latent, shape [n, *latent_shape]."""
        self._check_sampling(sampler, steps, guidance, conditioning, negative, options)
        if x_T is None:
            x_T = randn((n, *self.latent_shape), generator, self.device)
        elif tuple(x_T.shape) != (n, *self.latent_shape):
            raise ValueError(f"VAE.sample: x_T must be a latent of shape {(n, *self.latent_shape)}, "
                             f"got {tuple(x_T.shape)}")
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                x = self.decode(x_T.to(self.device)).clamp(-1, 1)
        finally:
            self.train(was)
        return SampleResult(x, 1)


def active_dimensions(vae: VAE, images: Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Latent dimensions whose posterior mean varies across ``images`` (Burda et al. 2016)."""
    with torch.no_grad():
        mu, _ = vae.encode(images.to(vae.device))
    return int((mu.float().flatten(1).var(dim=0) > threshold).sum())


# ---------------------------------------------------------------------------------------------
# KL autoencoder (the latent-diffusion first stage, Rombach et al. 2022, at small scale)


class AdversarialFields(BaseModel):
    """Config fields of the optional perceptual (LPIPS) and patch-GAN terms of an autoencoder
    (shared by the KL autoencoder and VQ-GAN)."""

    disc_weight: float = Field(0.0, ge=0.0, le=100.0, description="Weight of the patch-discriminator (hinge) "
                               "term for the autoencoder; 0 = no discriminator")
    disc_start: int = Field(0, ge=0, description="Training step from which the discriminator term is used")
    adaptive_weight: bool = Field(False, description="Scale the GAN term by |grad rec| / |grad GAN| at the "
                                  "decoder's last layer (Esser et al. 2021 eq. 7), times disc_weight")
    perceptual: str | None = Field(None, min_length=1, description="LPIPS weights (.safetensors written by "
                                   "`python -m imagegen.perceptual convert`) for a perceptual reconstruction "
                                   "term; None = off")
    perceptual_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the LPIPS term (per pixel, "
                                     "next to the per-pixel reconstruction term)")

    @field_validator("perceptual")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        # training may run in another working directory (torchrun ranks, a Prefect worker)
        return None if v is None else str(Path(v).expanduser().absolute())


class KLAutoencoderConfig(AdversarialFields, VAEConfig):
    beta: float = Field(1e-6, ge=0.0, le=1.0, description="KL weight (small: a regularised autoencoder, not a "
                        "generative VAE; Rombach et al. use 1e-6 on summed losses)")


class PatchDiscriminator(nn.Module):
    """A few strided convolutions giving one logit per patch (pix2pix / taming-transformers style)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), _block(2 * width, 2 * width),
            nn.Conv2d(2 * width, 1, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class AdversarialAutoencoder:
    """For an autoencoder Family whose Config has the :class:`AdversarialFields`: the frozen LPIPS
    network (held outside the module tree: neither trained nor checkpointed, not loaded for
    inference, moved with the model), the patch discriminator with its own optimizer that sits out
    until ``disc_start``, and the hinge losses.  The family provides ``autoencoder_parameters()``
    and a ``steps_done`` buffer counted in its ``after_step``."""

    def init_adversarial(self, channels: int, width: int) -> None:
        c = self.cfg  # type: ignore[attr-defined]
        self.discriminator = PatchDiscriminator(channels, width) if c.disc_weight > 0 else None
        if c.perceptual is not None and not loading_for_inference():
            from imagegen.perceptual import load_lpips

            object.__setattr__(self, "_perceptual", load_lpips(c.perceptual))

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        lp = self.__dict__.get("_perceptual")
        if lp is not None:  # moved (device, dtype) with the autoencoder
            lp._apply(fn, recurse)
        return out

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def optimizers_spec(self) -> dict[str, list[nn.Parameter]]:
        ae = self.autoencoder_parameters()
        if self.discriminator is None:
            return {"model": ae}
        return {"autoencoder": ae, "discriminator": list(self.discriminator.parameters())}

    def optimizers_for_step(self, step: int) -> list[str]:
        if self.discriminator is not None and step < self.cfg.disc_start:  # type: ignore[attr-defined]
            return ["autoencoder"]  # the discriminator sits out until its start step
        return list(self.optimizers_spec())

    def perceptual_distance(self, x_hat: Tensor, x: Tensor) -> Tensor | None:
        """LPIPS(x, x_hat) per image, or None without a perceptual term."""
        lp = self.__dict__.get("_perceptual")
        return None if lp is None else lp(x_hat, x)

    def adversarial_losses(self, x: Tensor, x_hat: Tensor, rec_loss: Tensor, ae_loss: Tensor,
                           logs: dict[str, float], last_layer: Tensor) -> LossOut:
        """The autoencoder loss (+ the weighted hinge generator term once the discriminator is on)
        and the discriminator's hinge loss on real images and detached reconstructions."""
        c = self.cfg  # type: ignore[attr-defined]
        if self.discriminator is None:
            return LossOut({"model": ae_loss}, logs)
        on = float(int(self.steps_done) >= c.disc_start)  # type: ignore[attr-defined]
        g_adv = -self.discriminator(x_hat).mean()
        weight = torch.full((), c.disc_weight, device=x.device)
        if c.adaptive_weight and on and torch.is_grad_enabled():
            g_rec, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
            g_gan, = torch.autograd.grad(g_adv, last_layer, retain_graph=True)
            weight = weight * (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        d_loss = F.relu(1 - self.discriminator(x)).mean() + F.relu(1 + self.discriminator(x_hat.detach())).mean()
        logs.update(g_adv=float(g_adv.detach()), disc_on=on, disc_loss=float(d_loss.detach()),
                    adv_weight=float(weight))
        return LossOut({"autoencoder": ae_loss + on * weight * g_adv, "discriminator": on * d_loss}, logs)


class KLAutoencoder(AdversarialAutoencoder, VAE):
    """Encoder/decoder with a downsampling factor 2^levels (4 or 8 for latent diffusion), loss =
    per-image summed L1 reconstruction + beta * KL (+ disc_weight * hinge adversarial term after
    ``disc_start``, with its own discriminator optimizer).  With ``perceptual`` set, each pixel's
    L1 gets ``perceptual_weight * LPIPS(x, x_hat)`` added, as in the latent-diffusion recipe
    (Rombach et al. 2022, whose autoencoder loss adds the image's LPIPS to every pixel's L1); the
    LPIPS network is frozen and held outside the module tree (not trained, not checkpointed) and
    not loaded for inference.  Latents are the posterior means; the latent scale factor is
    measured on the dataset when it is encoded (imagegen/latents.py)."""

    name: ClassVar[str] = "kl_autoencoder"
    Config: ClassVar[type[FamilyConfig]] = KLAutoencoderConfig

    cfg: KLAutoencoderConfig

    def __init__(self, cfg: KLAutoencoderConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.init_adversarial(self.cfg.channels, self.cfg.width)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps_done += 1

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x = self.check_images(batch)
        mu, logvar = self.encode(x)
        z = mu + (0.5 * logvar).exp() * randn(mu.shape, generator, mu.device, mu.dtype)
        x_hat = self.decode(z)
        recon = (x_hat.float() - x.float()).abs().flatten(1).sum(1)
        kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)
        logs = {"recon_l1": float(recon.mean().detach()) / x[0].numel(), "kl": float(kl.mean().detach()),
                "mse": float(F.mse_loss(x_hat.float(), x.float()).detach())}
        p = self.perceptual_distance(x_hat, x)
        if p is not None:
            recon = recon + self.cfg.perceptual_weight * x[0].numel() * p
            logs["lpips"] = float(p.mean().detach())
        ae_loss = (recon + self.cfg.beta * kl).mean()
        return self.adversarial_losses(x, x_hat, recon.mean(), ae_loss, logs, self.decoder.body[-1].weight)
