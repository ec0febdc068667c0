"""Image <-> patch-vector conversion and the patch encoder/decoder layers (paper §3.2).

An image (VAE latent or raw pixels, fn. 3) of C x H x W becomes (H/k)*(W/k) patch vectors of C*k*k values,
ordered left to right, top to bottom. The encoder maps patch vectors to the transformer width; the decoder
maps hidden states back to a noise prediction of the same shape.

Encoders implement `PatchEncoderBase`: `encode(x_t (P, D), t (P,)) -> ((P, dim), ctx)` and
`decode(h (P, dim), ctx) -> (P, D)`, where ctx is whatever the encoder hands its decoder within one forward
pass (None for the linear layer, the skip activations for the U-Net).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transfusion.config import ModelConfig, PatchEncoder
from transfusion.images import patchify, unpatchify


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (DDPM / transformer style): (P,) -> (P, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def image_timesteps(t: Tensor, n: int) -> Tensor | None:
    """(P,) per-patch timesteps -> (P / n,) one per image when the P patches are whole images of n patches that
    each share one timestep (training and the samplers always pass that); None otherwise. Decided on CPU only:
    on GPU the check would sync every step, so there the caller keeps per-patch work."""
    if t.device.type != "cpu" or t.numel() == 0 or t.shape[0] % n:
        return None
    per_image = t.view(-1, n)  # (N, n)
    return per_image[:, 0] if bool((per_image == per_image[:, :1]).all()) else None


class PatchEncoderBase(nn.Module):
    def encode(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Any]:  # (P, D), (P,) -> (P, dim), ctx
        raise NotImplementedError

    def decode(self, h: Tensor, ctx: Any) -> Tensor:  # (P, dim), ctx from encode -> (P, D)
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

    Patches always arrive as whole images of `image_patches` (n) rows in reading order, so a patch's index in its
    image is its row index modulo n. Each patch may carry its own timestep; when every image's patches share
    one (training, the samplers), the timestep MLP runs once per image instead of once per patch on CPU (1.7% of
    a 30-step sample). With `pos_emb`, a learned (n, dim) position embedding is added (`model.patch_pos_emb`)."""

    def __init__(self, patch_dim: int, dim: int, image_patches: int, t_freq_dim: int = 256, pos_emb: bool = False,
                 out_norm: bool = True, in_std: float = 0.0):
        super().__init__()
        self.t_freq_dim, self.n, self.in_std = t_freq_dim, image_patches, in_std
        self.pos = nn.Parameter(torch.empty(image_patches, dim)) if pos_emb else None
        self.t_mlp = nn.Sequential(nn.Linear(t_freq_dim, dim), nn.SiLU(), nn.Linear(dim, patch_dim))
        self.proj_in = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=True) if out_norm else None
        self.proj_out = nn.Linear(dim, patch_dim)

    def encode(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, None]:
        P, D = x_t.shape
        t_img = image_timesteps(t, self.n)  # (N,) or None
        if t_img is None:
            x = x_t + self.t_mlp(timestep_embedding(t, self.t_freq_dim).to(x_t.dtype))  # (P, D)
        else:
            temb = self.t_mlp(timestep_embedding(t_img, self.t_freq_dim).to(x_t.dtype))  # (N, D)
            x = (x_t.view(-1, self.n, D) + temb[:, None]).view(P, D)
        h = self.proj_in(x)  # (P, dim)
        if self.pos is not None:
            h = h + self.pos[torch.arange(P, device=h.device) % self.n].to(h.dtype)
        return h, None

    def decode(self, h: Tensor, ctx: None = None) -> Tensor:
        return self.proj_out(self.norm_out(h) if self.norm_out is not None else h)  # (P, D)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        in_std = self.in_std or std
        for lin in (self.t_mlp[0], self.t_mlp[2], self.proj_in):
            nn.init.normal_(lin.weight, std=in_std)
            nn.init.zeros_(lin.bias)
        if self.pos is not None:  # 2-D sin-cos structure at the scale of the other embeddings
            table = sincos_2d(math.isqrt(self.pos.shape[0]), self.pos.shape[1]).to(self.pos.device)
            self.pos.copy_(table * (std / table.std()))
        if self.norm_out is not None:
            nn.init.ones_(self.norm_out.weight)
            nn.init.zeros_(self.norm_out.bias)
        # zero-init the output so an untrained model predicts eps = 0 (DiT-style): stable early diffusion loss
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)


# --------------------------------------------------------------------------------- U-Net
#
# U-Net patch encoder/decoder (paper §3.2, Fig. 3, Table 7): down blocks before the transformer, up blocks
# after it, with skip connections from each down level to the matching up level.
#
#     encode:  patches (P, D) -> images (N, C, H, W) -> conv_in -> [ResBlock(t) x blocks, save skip, Down] x levels
#              -> (N, c_L, H/k, W/k) -> [Attention] -> 1x1 conv to dim -> (P, dim) in reading order
#     decode:  (P, dim) -> (N, dim, H/k, W/k) -> 1x1 conv to c_L -> [Attention] -> [Up, concat skip, ResBlock(t) x
#              blocks] x levels -> norm, SiLU, conv_out -> (N, C, H, W) -> patches (P, D)
#
# levels = log2(patch_size) (28x28 pixels in 4x4 patches: 28 -> 14 -> 7, two levels); the widths double per level
# from `unet_width`. The timestep enters every ResBlock as an added per-channel bias (Ho et al. 2020 style); like
# the paper (fn. 7) there is no adaptive norm: each norm is a plain layer norm over (C, H, W) (GroupNorm with one
# group). The convolutions see across patch borders, so the decoder can draw edges a linear layer cannot.
#
# With `attention` (model.unet_attention, on by default) a self-attention block over the patch grid follows the last
# down step and precedes the first up step: the paper's U-Net blocks "contain bidirectional attention within,
# independent of the transformer's attention mask" (§4.3.1), which is its explanation of why the U-Net helps most
# under a causal mask (Table 5). Each image attends only within itself.
#
# Patches arrive as whole images in reading order (the same contract as `LinearPatch`'s position embedding), and
# every patch of an image shares one timestep, so t of image i is t[i * n]. `encode` returns the skip activations
# as its context; `decode` of the same forward pass consumes them.


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, channels)  # layer norm over (C, H, W), paper fn. 7


class ResBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> + t-bias -> norm -> SiLU -> conv3x3, plus a (1x1 when widths differ) skip."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # (N, c_in, h, w), (N, t_dim) -> (N, c_out, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class GridAttention(nn.Module):
    """norm -> multi-head self-attention over one image's h*w positions -> projection, added to the input
    (zero-initialised projection: the block starts as the identity)."""

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (N, c, h, w) -> (N, c, h, w)
        N, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(N, 3, self.heads, c // self.heads, h * w)  # (N, 3, H, d, hw)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (N, H, hw, d) each
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, hw, d), no mask: bidirectional within the image
        return x + self.proj(out.transpose(-1, -2).reshape(N, c, h, w))


class UNetPatch(PatchEncoderBase):
    def __init__(self, channels: int, image_size: int, patch_size: int, dim: int, width: int = 64,
                 blocks: int = 1, t_freq_dim: int = 256, attention: bool = True, enc_norm: bool = False,
                 pos_emb: bool = False, skips: bool = True, out_rms: float = 0.0):
        super().__init__()
        levels = int(math.log2(patch_size))
        if 2**levels != patch_size:
            raise ValueError(f"the U-Net patch encoder needs a power-of-two patch_size, got {patch_size}")
        self.channels, self.size, self.k, self.t_freq_dim = channels, image_size, patch_size, t_freq_dim
        self.skips, self.out_rms = skips, out_rms  # model.unet_skips, model.unet_out_rms
        self.grid = image_size // patch_size
        widths = [width * 2**i for i in range(levels + 1)]  # level 0 (full resolution) .. levels (patch grid)
        t_dim = 4 * width
        self.t_mlp = nn.Sequential(nn.Linear(t_freq_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(widths[i], widths[i], t_dim) for _ in range(blocks)) for i in range(levels))
        self.downs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)
                                   for i in range(levels))
        self.attn_down = GridAttention(widths[-1]) if attention else None
        self.norm_enc = _norm(widths[-1]) if enc_norm else None  # model.unet_enc_norm
        self.pos = nn.Parameter(torch.empty(self.grid * self.grid, dim)) if pos_emb else None  # model.patch_pos_emb
        self.to_dim = nn.Conv2d(widths[-1], dim, 1)
        self.from_dim = nn.Conv2d(dim, widths[-1], 1)
        self.attn_up = GridAttention(widths[-1]) if attention else None
        self.ups = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in range(levels))
        self.up_blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(2 * widths[i] if j == 0 and skips else widths[i], widths[i], t_dim)
                          for j in range(blocks))
            for i in range(levels))
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], channels, 3, padding=1)

    def _images(self, x: Tensor) -> Tensor:  # (P, D) -> (N, C, H, W)
        n = self.grid * self.grid
        if x.shape[0] % n:
            raise ValueError(f"{x.shape[0]} patches are not whole images of {n} patches each")
        return unpatchify(x.reshape(-1, n, x.shape[-1]), self.k, self.channels, self.size, self.size)

    def encode(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, tuple[Tensor, list[Tensor]]]:
        n = self.grid * self.grid
        temb = self.t_mlp(timestep_embedding(t[::n], self.t_freq_dim).to(x_t.dtype))  # (N, t_dim)
        h = self.conv_in(self._images(x_t))  # (N, w0, H, W)
        skips = []
        for blocks, down in zip(self.down_blocks, self.downs):
            for block in blocks:
                h = block(h, temb)
            if self.skips:
                skips.append(h)
            h = down(h)  # (N, w_{i+1}, H/2^(i+1), W/2^(i+1))
        if self.attn_down is not None:
            h = self.attn_down(h)  # (N, w_L, g, g)
        if self.norm_enc is not None:
            h = self.norm_enc(h)
        h = self.to_dim(h).flatten(2).transpose(1, 2)  # (N, g*g, dim) reading order
        if self.out_rms > 0:
            h = F.layer_norm(h, h.shape[-1:]) * self.out_rms
        if self.pos is not None:
            h = h + self.pos.to(h.dtype)
        return h.reshape(-1, h.shape[-1]), (temb, skips)  # (P, dim)

    def decode(self, h: Tensor, ctx: tuple[Tensor, list[Tensor]]) -> Tensor:
        temb, skips = ctx
        g = self.grid
        x = h.reshape(-1, g, g, h.shape[-1]).permute(0, 3, 1, 2)  # (N, dim, g, g)
        x = self.from_dim(x)
        if self.attn_up is not None:
            x = self.attn_up(x)  # (N, w_L, g, g)
        for i in reversed(range(len(self.ups))):
            x = self.ups[i](F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, w_i, 2h, 2w)
            if self.skips:
                x = torch.cat([x, skips[i].to(x.dtype)], dim=1)
            for block in self.up_blocks[i]:
                x = block(x, temb)
        x = self.conv_out(F.silu(self.norm_out(x)))  # (N, C, H, W)
        return patchify(x, self.k).reshape(-1, self.channels * self.k * self.k)  # (P, D)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))  # PyTorch's default, kept explicit for meta
                bound = 1 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.bias, -bound, bound)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.to_dim.weight, std=std)  # the transformer sees inputs at its embedding scale
        nn.init.zeros_(self.to_dim.bias)
        if self.pos is not None:  # as LinearPatch's: 2-D sin-cos at the embedding scale
            table = sincos_2d(self.grid, self.pos.shape[1]).to(self.pos.device)
            self.pos.copy_(table * (std / table.std()))
        for blocks in (*self.down_blocks, *self.up_blocks):
            for block in blocks:  # residual branches start at identity
                nn.init.zeros_(block.conv2.weight)
                nn.init.zeros_(block.conv2.bias)
        for attn in (self.attn_down, self.attn_up):  # attention branches start at identity too
            if attn is not None:
                nn.init.zeros_(attn.proj.weight)
                nn.init.zeros_(attn.proj.bias)
        # zero output: an untrained model predicts eps = 0, as LinearPatch does
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)


def build_patch_encoder(cfg: ModelConfig) -> PatchEncoderBase:
    if cfg.patch_encoder == PatchEncoder.LINEAR:
        return LinearPatch(cfg.patch_dim, cfg.dim, cfg.patches_per_image, pos_emb=cfg.patch_pos_emb,
                           out_norm=cfg.patch_out_norm, in_std=cfg.patch_init_std)
    return UNetPatch(cfg.image_channels, cfg.image_size, cfg.patch_size, cfg.dim, width=cfg.unet_width,
                     blocks=cfg.unet_blocks, attention=cfg.unet_attention, enc_norm=cfg.unet_enc_norm,
                     pos_emb=cfg.patch_pos_emb, skips=cfg.unet_skips, out_rms=cfg.unet_out_rms)
