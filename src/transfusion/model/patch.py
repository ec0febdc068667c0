"""Image <-> patch-vector conversion and the patch encoder/decoder layers (paper §3.2).

An image (VAE latent or raw pixels, fn. 3) of C x H x W becomes (H/k)*(W/k) patch vectors of C*k*k values,
ordered left to right, top to bottom. The encoder maps patch vectors to the transformer width; the decoder
maps hidden states back to a noise prediction of the same shape.

Encoders implement `PatchEncoderBase`: `encode(x_t (P, D), t (P,)) -> (P, dim)` and
`decode(h (P, dim)) -> (P, D)`. A U-Net encoder (down blocks before, up blocks after the transformer) fits this
interface once it works on whole images; it is not built yet and asking for it raises.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from transfusion.config import ModelConfig, PatchEncoder


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, (H/k)*(W/k), C*k*k), raster order; each vector is (C, k, k) flattened."""
    N, C, H, W = images.shape
    k = patch_size
    if H % k or W % k:
        raise ValueError(f"image of {H}x{W} cannot be cut into {k}x{k} patches")
    x = images.reshape(N, C, H // k, k, W // k, k)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (N, H/k, W/k, C, k, k)
    return x.reshape(N, (H // k) * (W // k), C * k * k)


def unpatchify(patches: Tensor, patch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of `patchify`: (N, n, C*k*k) -> (N, C, H, W)."""
    N, n, D = patches.shape
    k = patch_size
    if D != channels * k * k or n != (height // k) * (width // k):
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not form {channels}x{height}x{width} images "
            f"in {k}x{k} patches"
        )
    x = patches.reshape(N, height // k, width // k, channels, k, k)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (N, C, H/k, k, W/k, k)
    return x.reshape(N, channels, height, width)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (DDPM / transformer style): (P,) -> (P, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PatchEncoderBase(nn.Module):
    def encode(self, x_t: Tensor, t: Tensor) -> Tensor:  # (P, D), (P,) -> (P, dim)
        raise NotImplementedError

    def decode(self, h: Tensor) -> Tensor:  # (P, dim) -> (P, D)
        raise NotImplementedError

    def init_weights(self, std: float) -> None:
        raise NotImplementedError


def sincos_2d(grid: int, dim: int) -> Tensor:
    """(grid*grid, dim) 2-D sin-cos table in reading order: half the channels encode the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    quarter = dim // 4
    freqs = 1.0 / (10_000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1)))
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        ang = coord[:, None].double() * freqs[None]
        parts += [ang.sin(), ang.cos()]
    table = torch.cat(parts, dim=-1).float()
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


class LinearPatch(PatchEncoderBase):
    """Linear patch encoding (paper §3.2) with the timestep embedding added to each patch vector *before* the
    linear layer (fn. 6). The embedding is a sinusoid of t passed through a small MLP into patch space.

    With `patches_per_image` set, a learned (n, dim) position embedding is added to the encodings (an option,
    `model.patch_pos_emb`). Patches always arrive as whole images in reading order, so a patch's index in its
    image is its row index modulo n."""

    def __init__(self, patch_dim: int, dim: int, t_freq_dim: int = 256, patches_per_image: int = 0):
        super().__init__()
        self.t_freq_dim = t_freq_dim
        self.pos = nn.Parameter(torch.empty(patches_per_image, dim)) if patches_per_image else None
        self.t_mlp = nn.Sequential(nn.Linear(t_freq_dim, dim), nn.SiLU(), nn.Linear(dim, patch_dim))
        self.proj_in = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=True)
        self.proj_out = nn.Linear(dim, patch_dim)

    def encode(self, x_t: Tensor, t: Tensor) -> Tensor:
        temb = self.t_mlp(timestep_embedding(t, self.t_freq_dim).to(x_t.dtype))  # (P, D)
        h = self.proj_in(x_t + temb)  # (P, dim)
        if self.pos is not None:
            n = self.pos.shape[0]
            h = h + self.pos[torch.arange(h.shape[0], device=h.device) % n].to(h.dtype)
        return h

    def decode(self, h: Tensor) -> Tensor:
        return self.proj_out(self.norm_out(h))  # (P, D)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        for lin in (self.t_mlp[0], self.t_mlp[2], self.proj_in):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        if self.pos is not None:  # 2-D sin-cos structure at the scale of the other embeddings
            table = sincos_2d(math.isqrt(self.pos.shape[0]), self.pos.shape[1]).to(self.pos.device)
            self.pos.copy_(table * (std / table.std()))
        nn.init.ones_(self.norm_out.weight)
        nn.init.zeros_(self.norm_out.bias)
        # zero-init the output so an untrained model predicts eps = 0 (DiT-style): stable early diffusion loss
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)


def build_patch_encoder(cfg: ModelConfig) -> PatchEncoderBase:
    if cfg.patch_encoder == PatchEncoder.LINEAR:
        return LinearPatch(cfg.patch_dim, cfg.dim, patches_per_image=cfg.patches_per_image if cfg.patch_pos_emb else 0)
    raise NotImplementedError(
        f"model.patch_encoder={cfg.patch_encoder.value!r} is not implemented yet; use 'linear'"
    )
