"""A dataset's images as an autoencoder's latents (`data.vae`, paper §2.3): what a latent Transfusion trains on.

The pixel images of a split are encoded once per autoencoder and kept in the latent cache
(autoencoder/cache.py, keyed by the VAE's fingerprint and the images' content); `LatentImageSet` then serves
them like any ImageTextSet (same captions, labels, interleaved text), so packing, collation and the loader do
not know whether a patch holds pixels or latents.

KL latents are the posterior mean, not a fresh sample per step: the batches stay a pure function of the step
(exact resume, rank-independent), and at the paper's KL weight 1e-6 the posterior is nearly a point: for
configs/vae/emoji_kl.toml its std is 0.003 on average (max 0.04) against the scaled latents' unit std, so
sampling would add next to nothing. VQ latents are the quantised codes' vectors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from transfusion.config import Config, ConfigError
from transfusion.data.image_text import ImageTextSet, numpy_patchify


class LatentImageSet(ImageTextSet):
    """ImageTextSet whose images are float latents (N, C, h, w); `pixels` keeps the latents, not uint8."""

    def __init__(self, source: ImageTextSet, latents: Tensor) -> None:
        if len(latents) != len(source):
            raise ValueError(f"{len(latents)} latents for {len(source)} images")
        super().__init__(pixels=latents.float().contiguous(), caption_of=source.caption_of,
                         caption_sets=source.caption_sets, image_size=int(latents.shape[-1]),
                         labels=source.labels, name=f"{source.name} (latents)", interleaved=source.interleaved)
        self._np = self.pixels.numpy()  # shares memory: patches() slices without a copy of the whole set

    def render(self, idx: Tensor | np.ndarray) -> Tensor:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return self.pixels[idx]  # (n, C, h, w)

    def patches(self, idx: np.ndarray, patch_size: int) -> Tensor:
        return numpy_patchify(self._np[np.asarray(idx, dtype=np.int64)], patch_size)


def latent_image_set(cfg: Config, source: ImageTextSet, split: str) -> LatentImageSet:
    """`source` (pixels at model.image_size x the VAE's factor) encoded by the autoencoder `data.vae` names."""
    from transfusion.autoencoder.cache import split_latents
    from transfusion.autoencoder.codec import image_codec
    from transfusion.codec import LatentCodec

    codec = image_codec(cfg)
    if not isinstance(codec, LatentCodec):
        raise ConfigError("latent_image_set needs data.vae")
    if source.image_size != codec.pixel_size:
        raise ValueError(f"{source.name}: images of {source.image_size} px, the codec takes {codec.pixel_size}")
    cached = split_latents(codec.ae, source, split, progress=True)
    if tuple(cached.latents.shape[1:]) != (cfg.model.image_channels, cfg.model.image_size, cfg.model.image_size):
        raise ConfigError(f"the autoencoder's latents are {tuple(cached.latents.shape[1:])}, but [model] takes "
                          f"{cfg.model.image_channels}x{cfg.model.image_size}x{cfg.model.image_size}")
    return LatentImageSet(source, cached.latents)
