"""VQ-GAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis"): the VQ
tokenizer of models/vq.py (any of its quantisers: VQ codebook, FSQ, LFQ) trained with a
perceptual and an adversarial term, the first stage of the token models (MaskGIT, the raster
transformer).

    L_AE = |x - x_hat|^2 + w_p LPIPS(x, x_hat)  +  quantiser terms  +  lambda * d(step) * (-D(x_hat))
    L_D  = d(step) * (relu(1 - D(x)) + relu(1 + D(sg(x_hat))))          (hinge)

D is the patch discriminator of the KL autoencoder (models/vae.py; one logit per patch), with its
own optimizer; d(step) switches the GAN terms on at ``disc_start`` (the discriminator sits out
until then).  lambda is the paper's adaptive weight (eq. 7): ``disc_weight`` * |grad_GL L_rec| /
(|grad_GL L_GAN| + 1e-4), GL the decoder's last layer, so the GAN term never overwhelms the
reconstruction.  The LPIPS network (imagegen/perceptual.py) is frozen, held outside the module
tree and not loaded for inference, exactly as for the KL autoencoder: the perceptual and GAN
machinery is that model's (``AdversarialAutoencoder``), not a copy.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from pydantic import Field
from torch import nn

from imagegen.checks import Problems
from models.base import FamilyConfig, LossOut
from models.vae import AdversarialAutoencoder, AdversarialFields
from models.vq import VQConfig, VQTokenizer


class VQGANConfig(AdversarialFields, VQConfig):
    disc_weight: float = Field(0.8, ge=0.0, le=100.0, description="Weight of the hinge GAN term (times the "
                               "adaptive weight); taming-transformers' default")
    adaptive_weight: bool = Field(True, description="Scale the GAN term by |grad rec| / |grad GAN| at the "
                                  "decoder's last layer (Esser et al. 2021 eq. 7)")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if p.can("disc_weight") and self.disc_weight <= 0:
            p.add("disc_weight must be > 0 (without a discriminator train family 'vq')")


class VQGAN(AdversarialAutoencoder, VQTokenizer):
    name: ClassVar[str] = "vqgan"
    Config: ClassVar[type[FamilyConfig]] = VQGANConfig

    cfg: VQGANConfig

    def __init__(self, cfg: VQGANConfig | Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.init_adversarial(self.cfg.channels, self.cfg.width)
        if "steps_done" not in self._buffers:  # the VQ codebook counts its steps already
            self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.pre.parameters(), *self.decoder.parameters()]

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()  # codebook EMA / restarts; counts steps_done for quantizer 'vq'
        if self.cfg.quantizer != "vq":
            self.steps_done += 1

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> LossOut:
        x = self.check_images(batch)
        x_hat, recon, extra, logs = self.reconstruct(x)
        rec = recon
        p = self.perceptual_distance(x_hat, x)
        if p is not None:
            rec = rec + self.cfg.perceptual_weight * p.mean()
            logs["lpips"] = float(p.mean().detach())
        return self.adversarial_losses(x, x_hat, rec, rec + extra, logs, self.decoder.body[-1].weight)
