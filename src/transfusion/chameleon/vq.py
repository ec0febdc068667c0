"""The quantiser the Chameleon baseline reads images through, and how `data.vq` names one.

Interface (the VQ-VAE of transfusion.autoencoder offers it; so does `FixedQuantizer`):

    codebook_size: int
    encode_indices(images (N, C, H, W) in [-1, 1]) -> (N, h, w) long codes in [0, codebook_size)
    decode_indices(codes (N, h, w) long) -> images (N, C, H, W) in [-1, 1]

`data.vq`:
    "fixed:L"   FixedQuantizer(L, model.patch_size): no parameters, L**3 codes. Plumbing, tests and a floor for
                the baseline (it keeps colour and coarse shape, nothing finer).
    PATH        a VQ-VAE checkpoint or run directory, read by transfusion.autoencoder's `load_vq`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.config import Config, ConfigError


class Quantizer(Protocol):
    codebook_size: int

    def encode_indices(self, images: Tensor) -> Tensor: ...

    def decode_indices(self, codes: Tensor) -> Tensor: ...


class FixedQuantizer:
    """Each factor x factor patch -> its mean colour, each channel rounded to one of `levels` values.

    code = sum_c level_c * levels**c (channel 0 lowest); decoding paints the patch in that colour."""

    def __init__(self, levels: int, factor: int, channels: int = 3):
        if levels < 2 or factor < 1:
            raise ConfigError(f"fixed quantiser: levels >= 2 and factor >= 1, got {levels}, {factor}")
        self.levels, self.factor, self.channels = levels, factor, channels
        self.codebook_size = levels**channels
        self.fingerprint = f"fixed:{levels}:{factor}:{channels}"

    def encode_indices(self, images: Tensor) -> Tensor:  # (N, C, H, W) -> (N, h, w)
        mean = F.avg_pool2d(images.float(), self.factor)  # (N, C, h, w) in [-1, 1]
        level = ((mean + 1) / 2 * (self.levels - 1)).round().clamp(0, self.levels - 1).long()
        weights = self.levels ** torch.arange(self.channels, device=images.device)  # (C,)
        return (level * weights[None, :, None, None]).sum(1)

    def decode_indices(self, codes: Tensor) -> Tensor:  # (N, h, w) -> (N, C, H, W)
        digits = [(codes // self.levels**c) % self.levels for c in range(self.channels)]
        colour = torch.stack(digits, 1).float() / (self.levels - 1) * 2 - 1  # (N, C, h, w)
        return colour.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)


def load_vq(cfg: Config, device: str | torch.device = "cpu") -> Quantizer:
    """The quantiser `data.vq` names (module docstring), checked against the model config."""
    spec, m = cfg.data.vq, cfg.model
    if not spec:
        raise ConfigError('model.family = "chameleon" needs data.vq: a VQ-VAE checkpoint, or "fixed:L"')
    if spec.startswith("fixed:"):
        try:
            vq: Quantizer = FixedQuantizer(int(spec.split(":", 1)[1]), m.patch_size, m.image_channels)
        except ValueError:
            raise ConfigError(f'data.vq={spec!r}: expected "fixed:L" with L an integer') from None
    else:
        try:
            from transfusion.autoencoder import load_vq as load_autoencoder_vq  # the VQ-VAE twin (issue 14)
        except ImportError as e:
            raise ConfigError(f"data.vq={spec!r}: the VQ-VAE loader transfusion.autoencoder.load_vq is not "
                              f"available ({e})") from None
        vq = load_autoencoder_vq(spec, device=device)
    if vq.codebook_size != m.codebook_size:
        raise ConfigError(f"data.vq has {vq.codebook_size} codes but model.codebook_size={m.codebook_size}")
    return vq
