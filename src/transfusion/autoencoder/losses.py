"""The autoencoder objective of paper App. A (after Esser et al. 2021 / LDM):

    KL-VAE:  L = L1 + LPIPS + 0.5 GAN + 0.2 ID + 1e-6 KL
    VQ-VAE:  L = L1 + LPIPS + 0.5 GAN + 0.2 ID + 1.0 (codebook + 0.25 commitment)

- L1: mean absolute error over pixels.
- KL: LDM sums the KL over each image's latent elements and the reconstruction over its pixels, with weight
  1e-6 on the KL. We keep L1 a per-pixel mean (the VQ twin's scale) and divide the per-image KL sum by the pixel
  count instead: the same ratio of the two terms, hence the same optimum, and under Adam (invariant to a
  constant loss scale) the same training as LDM's kl_weight = 1e-6. The raw per-image KL is logged.
- GAN (hinge): the generator term -mean D(x_rec) times an adaptive weight ||grad_last L_nll|| / ||grad_last
  L_g||, both gradients taken at the decoder's last layer, clamped to [0, adaptive_max] and detached (LDM), so
  the adversarial gradient arrives at the size of the reconstruction's. Nothing of the GAN (not even a
  discriminator call) runs before train.gan_start (paper: "we delay the beginning of GAN training").
- Discriminator: hinge loss 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))).
- LPIPS / ID: perceptual feature distances through a user-supplied TorchScript network (`FeatureLoss`); no
  LPIPS, VGG or MoCo weights ship offline here, so both are off by default.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transfusion.autoencoder.config import LossConfig
from transfusion.autoencoder.model import AEOutput, Autoencoder
from transfusion.config import ConfigError


class FeatureLoss(nn.Module):
    """Distance between the features a frozen TorchScript network gives two image batches (LPIPS-like without
    learned per-channel weights): the network maps (N, 3, H, W) in [-1, 1] to a tensor or a list of tensors;
    each is unit-normalised over channels (dim 1), and the squared differences are averaged, then summed over
    the feature maps. Loaded with torch.jit.load only (never unpickled), like FID's Inception."""

    def __init__(self, path: str, name: str) -> None:
        super().__init__()
        if not Path(path).is_file():
            raise ConfigError(f"loss.{name}_weights={path!r}: no such file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(path, map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"loss.{name}_weights={path!r} is not a TorchScript network ({e})") from None
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def _features(self, x: Tensor) -> list[Tensor]:
        out = self.net(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = x.new_zeros(())
        for fx, fy in zip(self._features(x), self._features(y.detach())):
            total = total + (F.normalize(fx, dim=1) - F.normalize(fy, dim=1)).pow(2).mean()
        return total


@dataclass
class LossParts:
    """The generator-side loss of one step and its parts (floats for the log)."""

    total: Tensor
    logs: dict[str, float] = field(default_factory=dict)


def _f(t: Tensor) -> float:
    return float(t.detach())


def kl_term(out: AEOutput, pixels_per_image: int) -> tuple[Tensor, float]:
    """(per-image KL sum / pixel count, averaged over the batch; raw mean per-image KL for the log)."""
    kl = out.posterior.kl()  # (B,)
    return kl.mean() / pixels_per_image, _f(kl.mean())


def adaptive_weight(nll: Tensor, g_loss: Tensor, last: Tensor, max_weight: float) -> Tensor:
    """||d nll / d last|| / (||d g / d last|| + 1e-4), clamped to [0, max_weight], detached (LDM)."""
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AELoss(nn.Module):
    """The generator-side objective and the discriminator's, with the GAN switched on at `gan_start`."""

    def __init__(self, cfg: LossConfig, discriminator: nn.Module, gan_start: int) -> None:
        super().__init__()
        self.cfg, self.gan_start = cfg, gan_start
        self.discriminator = discriminator
        self.lpips = FeatureLoss(cfg.lpips_weights, "lpips") if cfg.lpips > 0 else None
        self.moco = FeatureLoss(cfg.moco_weights, "moco") if cfg.moco > 0 else None

    def gan_active(self, step: int) -> bool:
        return self.cfg.gan > 0 and step >= self.gan_start

    def generator_loss(self, model: Autoencoder, images: Tensor, out: AEOutput, step: int) -> LossParts:
        c = self.cfg
        l1 = (out.recon - images).abs().mean()
        nll = c.l1 * l1
        logs = {"l1": _f(l1)}
        for name, net, weight in (("lpips", self.lpips, c.lpips), ("moco", self.moco, c.moco)):
            if net is not None:
                term = net(out.recon, images)
                nll = nll + weight * term
                logs[name] = _f(term)
        total = nll
        if out.posterior is not None:
            kl, kl_raw = kl_term(out, images[0].numel())
            total = total + c.kl * kl
            logs["kl"] = kl_raw
        else:
            total = total + c.codebook * out.quant.loss
            logs["codebook_loss"] = _f(out.quant.codebook_loss)
            logs["commitment_loss"] = _f(out.quant.commitment_loss)
        if self.gan_active(step):
            g_loss = -self.discriminator(out.recon).float().mean()
            weight = adaptive_weight(nll, g_loss, model.last_layer, c.adaptive_max)
            total = total + c.gan * weight * g_loss
            logs.update(g_loss=_f(g_loss), d_weight=_f(weight))
        logs["loss"] = _f(total)
        return LossParts(total, logs)

    def discriminator_loss(self, images: Tensor, recon: Tensor) -> LossParts:
        logits_real = self.discriminator(images).float()
        logits_fake = self.discriminator(recon.detach()).float()
        loss = hinge_d_loss(logits_real, logits_fake)
        return LossParts(loss, {"d_loss": _f(loss), "logits_real": _f(logits_real.mean()),
                                "logits_fake": _f(logits_fake.mean())})
