"""The convolutional encoder and decoder shared by the KL-VAE and the VQ-VAE (paper App. A: "a CNN encoder and
decoder" following Esser et al. 2021), and the PatchGAN discriminator of the adversarial loss.

Encoder: conv_in -> per level `blocks` ResNet blocks (GroupNorm + SiLU + 3x3 conv, twice, with a skip), then a
stride-2 convolution except after the last level -> middle (ResBlock, optional self-attention, ResBlock) ->
GroupNorm + SiLU + conv_out. The decoder mirrors it with nearest-neighbour upsampling + conv and one extra block
per level (as taming/LDM: the decoder does more of the work). Widths are per level, e.g. [32, 64, 128] for f = 4.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, c_in, H, W) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of the lowest resolution (global context is cheap
    there: 16x16 = 256 positions at f = 4 on 64x64 images)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w)
        B, C, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, h * w).transpose(-1, -2).unbind(1)  # (B, hw, C) each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, hw, C)
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, groups: int, attention: bool) -> nn.Sequential:
    layers: list[nn.Module] = [ResBlock(channels, channels, groups)]
    if attention:
        layers.append(AttnBlock(channels, groups))
    layers.append(ResBlock(channels, channels, groups))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """(B, image_channels, H, W) -> (B, out_channels, H/f, W/f), f = 2^(len(widths) - 1)."""

    def __init__(self, image_channels: int, widths: list[int], blocks: int, out_channels: int, groups: int,
                 attention: bool) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(image_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(blocks):
                layers.append(ResBlock(c, w, groups))
                c = w
            if i < len(widths) - 1:
                layers.append(Downsample(c))
        self.down = nn.Sequential(*layers)
        self.mid = _middle(c, groups, attention)
        self.norm_out = _norm(c, groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, image_channels, h*f, w*f); `conv_out` is the adaptive weight's layer."""

    def __init__(self, image_channels: int, widths: list[int], blocks: int, latent_channels: int, groups: int,
                 attention: bool) -> None:
        super().__init__()
        c = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.mid = _middle(c, groups, attention)
        layers: list[nn.Module] = []
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                layers.append(ResBlock(c, w, groups))
                c = w
            if i > 0:
                layers.append(Upsample(c))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(c, groups)
        self.conv_out = nn.Conv2d(c, image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchDiscriminator(nn.Module):
    """NLayer PatchGAN (Isola et al. 2017, as taming's): a logit per overlapping patch, (B, 1, h', w').

    GroupNorm instead of the reference's BatchNorm: the discriminator sees real and fake batches in separate
    calls, and batch statistics would make its output depend on the batch mix (and on eval/train mode)."""

    def __init__(self, image_channels: int, width: int, n_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(image_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, n_layers + 1):
            c_out = width * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            groups = 8 if c_out % 8 == 0 else 1
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False), _norm(c_out, groups),
                       nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) in [-1, 1] -> (B, 1, h', w') logits
        return self.net(x)

    @staticmethod
    def output_size(image_size: int, n_layers: int) -> int:
        """Side of the logit map for an image side (validates configs before any weight exists)."""
        s = image_size
        for _ in range(n_layers):  # stride-2 convs (k 4, pad 1): s -> s // 2
            s //= 2
        return s - 2  # two stride-1 convs (k 4, pad 1): s -> s - 1 each


def _dcgan_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@torch.no_grad()
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
