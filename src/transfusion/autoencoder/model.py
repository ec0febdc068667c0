"""The autoencoder other code uses: images (N, 3, H, W) in [-1, 1] <-> latents (N, C, H/f, W/f).

    ae = load_autoencoder("runs/vae_kl")            # autoencoder/checkpoint.py
    z = ae.encode(images)                            # scaled latents, ~zero mean / unit variance per channel
    images = ae.decode(z)
    ae.encode_indices(images) / ae.decode_indices(idx)   # VQ only: (N, h, w) codes for a Chameleon baseline
    ae.fingerprint()                                 # hash of weights + config: the latent cache's key

One class for both kinds: the KL-VAE's encoder emits a mean and a log-variance per latent channel (a diagonal
Gaussian); the VQ-VAE's emits C channels that a 1x1 projection maps into the codebook's space before the
nearest-code lookup (paper App. A: "quantization after projecting to 8 dims").

Latent scale: `latent_shift` / `latent_scale` (buffers, saved with the weights) are the mean and std of the raw
latents over training data, measured after training (autoencoder/train.py). `encode` returns (z - shift) / scale
and `decode` undoes it, so a diffusion model sees ~unit-variance latents whatever the KL weight left them at.
A fresh model has shift 0, scale 1 (`latent_scale_ready` says whether statistics were measured).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from transfusion.autoencoder.config import AEKind, ScaleMode, VAEConfig, to_dict
from transfusion.autoencoder.networks import Decoder, Encoder
from transfusion.autoencoder.quantize import QuantOut, VectorQuantizer


class AutoencoderError(ValueError):
    """Misuse a caller can fix: codes asked of a KL-VAE, images of the wrong shape or range of sizes."""


@dataclass
class Posterior:
    """Diagonal Gaussian q(z|x) = N(mean, exp(logvar)) per latent element."""

    mean: Tensor  # (B, C, h, w)
    logvar: Tensor  # (B, C, h, w), clamped to [-30, 20] as LDM (exp stays finite)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        where = generator.device if generator is not None else self.mean.device  # a CPU generator may drive CUDA
        noise = torch.randn(self.mean.shape, generator=generator, device=where, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over each image's latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class AEOutput:
    recon: Tensor  # (B, 3, H, W)
    z: Tensor  # (B, C, h, w) the latents the decoder saw (a posterior sample / the straight-through z_q)
    posterior: Posterior | None = None  # KL
    quant: QuantOut | None = None  # VQ
    z_e: Tensor | None = None  # VQ: projected encoder output before quantisation (k-means and restarts use it)


class Autoencoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.latent_channels
        enc_out = 2 * C if cfg.kind == AEKind.KL else C
        self.encoder = Encoder(cfg.image_channels, cfg.widths, cfg.blocks, enc_out, cfg.norm_groups, cfg.attention)
        self.quant_conv = nn.Conv2d(enc_out, enc_out, 1)  # KL: moments; VQ: the projection into code space
        self.quantizer = VectorQuantizer(cfg.codebook_size, C, cfg.beta) if cfg.kind == AEKind.VQ else None
        self.post_quant_conv = nn.Conv2d(C, C, 1)
        self.decoder = Decoder(cfg.image_channels, cfg.widths, cfg.blocks, C, cfg.norm_groups, cfg.attention)
        n_stats = C if cfg.scale_mode == ScaleMode.CHANNEL else 1
        self.register_buffer("latent_shift", torch.zeros(n_stats))
        self.register_buffer("latent_scale", torch.ones(n_stats))
        self.register_buffer("latent_scale_ready", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ properties other code reads

    @property
    def kind(self) -> AEKind:
        return self.cfg.kind

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    @property
    def factor(self) -> int:
        return self.cfg.factor

    @property
    def codebook_size(self) -> int:
        if self.quantizer is None:
            raise AutoencoderError("a KL-VAE has no codebook (codebook_size is a VQ-VAE property)")
        return self.cfg.codebook_size

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight: the adaptive GAN weight compares gradient norms here (LDM)."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ training-time pieces (raw latents)

    def _check(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.cfg.image_channels:
            raise AutoencoderError(f"expected images (N, {self.cfg.image_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise AutoencoderError(f"image size {tuple(images.shape[-2:])} is not a multiple of the factor "
                                   f"{self.factor}")

    def posterior(self, images: Tensor) -> Posterior:
        mean, logvar = self.quant_conv(self.encoder(images)).float().chunk(2, dim=1)  # fp32 under autocast
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def quantize(self, images: Tensor) -> tuple[Tensor, QuantOut]:
        """(z_e, quantiser output) of images: the projected encoder output and its nearest codes."""
        z_e = self.quant_conv(self.encoder(images)).float()  # nearest-code distances in fp32 under autocast
        return z_e, self.quantizer(z_e)

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z)).float()

    def forward(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> AEOutput:
        """The training pass: reconstruction plus what the regulariser needs (posterior or quantiser output)."""
        self._check(images)
        if self.quantizer is None:
            post = self.posterior(images)
            z = post.sample(generator) if sample else post.mean
            return AEOutput(self.decode_raw(z), z, posterior=post)
        z_e, q = self.quantize(images)
        return AEOutput(self.decode_raw(q.z_q), q.z_q, quant=q, z_e=z_e)

    def raw_latents(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Unscaled latents: KL posterior mean (or a sample), VQ quantised codes."""
        self._check(images)
        if self.quantizer is None:
            post = self.posterior(images)
            return post.sample(generator) if sample else post.mean
        return self.quantize(images)[1].z_q

    # ------------------------------------------------------------------ the public API (scaled latents)

    def _stats(self) -> tuple[Tensor, Tensor]:
        return self.latent_shift.view(1, -1, 1, 1), self.latent_scale.view(1, -1, 1, 1)

    def scale(self, z: Tensor) -> Tensor:
        shift, scale = self._stats()
        return (z - shift) / scale

    def unscale(self, z: Tensor) -> Tensor:
        shift, scale = self._stats()
        return z * scale + shift

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f). KL: the posterior mean unless `sample`."""
        return self.scale(self.raw_latents(images, sample, generator))

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise AutoencoderError(f"expected latents (N, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        return self.decode_raw(self.unscale(latents))

    def encode_indices(self, images: Tensor) -> Tensor:
        """VQ: (N, 3, H, W) -> code indices (N, H/f, W/f) long, each in [0, codebook_size)."""
        if self.quantizer is None:
            raise AutoencoderError("encode_indices needs a VQ-VAE (vae.kind = \"vq\"); this one is a KL-VAE")
        self._check(images)
        return self.quantize(images)[1].indices

    def decode_indices(self, indices: Tensor) -> Tensor:
        """VQ: code indices (N, h, w) -> images (N, 3, h*f, w*f)."""
        if self.quantizer is None:
            raise AutoencoderError("decode_indices needs a VQ-VAE (vae.kind = \"vq\"); this one is a KL-VAE")
        if indices.dim() != 3 or indices.dtype != torch.long:
            raise AutoencoderError(f"expected indices (N, h, w) long, got {tuple(indices.shape)} {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.cfg.codebook_size):
            raise AutoencoderError(f"code indices must lie in [0, {self.cfg.codebook_size})")
        return self.decode_raw(self.quantizer.lookup(indices))

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the config and every weight and buffer: equal only for the same VAE."""
        h = hashlib.sha256(json.dumps(to_dict(self.cfg), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
