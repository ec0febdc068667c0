"""What the transformer's images are: raw pixels (paper fn. 3) or a VAE's latents (§2.3, the main setting).

    codec = image_codec(cfg)          # autoencoder/codec.py: data.vae = "" -> pixels, else that VAE's latents
    x = codec.encode(images)          # (N, 3, S, S) pixels in [-1, 1] -> (N, C, s, s) what the model sees
    images = codec.decode(x)          # the reverse, pixels in [-1, 1]
    codec.clip_x0                     # the samplers' x0 clip: 1.0 for pixels, None for latents

Every command that hands images to a model or gets images from it goes through the codec of the model's own
config, so `sample`, `caption`, `generate`, `edit`, `eval`, `serve` and the trainer's grids work on latent
models unchanged. A pixel codec is the identity; a latent codec checks that the autoencoder is the one the
model was trained with (its fingerprint is recorded in the run) and that its latent shape is the model's.
This module knows no checkpoint or autoencoder code (decoding imports it); building the codec of a config,
which loads an autoencoder from disk, is autoencoder/codec.py's `image_codec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor



@dataclass
class PixelCodec:
    """The model sees pixels in [-1, 1]: the identity; the samplers clip x0 to the pixel range."""

    channels: int
    pixel_size: int  # pixels per side the model draws (= model.image_size)
    factor: int = 1
    clip_x0: float | None = 1.0
    fingerprint: str = "pixels"

    def encode(self, images: Tensor) -> Tensor:  # (N, C, S, S) -> (N, C, S, S)
        return images

    def decode(self, x: Tensor) -> Tensor:
        return x.float().clamp(-1, 1)


class LatentCodec:
    """The model sees an autoencoder's scaled latents (autoencoder/): no x0 clipping (latents are not bounded)."""

    clip_x0: float | None = None

    def __init__(self, autoencoder: Any, path: str, latent_size: int) -> None:
        self.ae, self.path = autoencoder.eval(), path
        self.channels = int(autoencoder.latent_channels)
        self.factor = int(autoencoder.factor)
        self.pixel_size = latent_size * self.factor  # images in and out are this many pixels per side
        self.fingerprint = str(autoencoder.fingerprint())

    @torch.no_grad()
    def encode(self, images: Tensor, batch: int = 64) -> Tensor:  # (N, 3, S, S) -> (N, C, S/f, S/f)
        dev = next(self.ae.parameters()).device  # the model may live elsewhere (GPU training, CPU VAE)
        return torch.cat([self.ae.encode(images[k:k + batch].float().to(dev)).to(images.device)
                          for k in range(0, len(images), batch)])

    @torch.no_grad()
    def decode(self, x: Tensor, batch: int = 64) -> Tensor:  # (N, C, s, s) -> (N, 3, s*f, s*f) in [-1, 1]
        dev = next(self.ae.parameters()).device
        return torch.cat([self.ae.decode(x[k:k + batch].float().to(dev)).to(x.device)
                          for k in range(0, len(x), batch)]).clamp(-1, 1)


Codec = PixelCodec | LatentCodec


def encode_images(codec: Codec | None, images: Tensor) -> Tensor:
    """Pixels -> what the model sees (no codec: pixels)."""
    return images if codec is None else codec.encode(images)


def decode_images(codec: Codec | None, x: Tensor) -> Tensor:
    """What the model drew -> pixels (no codec: pixels)."""
    return x if codec is None else codec.decode(x)


def clip_for(codec: Codec | None, clip_x0: float | None) -> float | None:
    """The samplers' x0 clip: the codec's (1.0 pixels, None latents) when there is one, else the caller's."""
    return clip_x0 if codec is None else codec.clip_x0
