"""Images in one convention, read and resized by one rule everywhere (training data, CLI, evaluation).

- Pixels in the model are float in [-1, 1] (`from_uint8` / `from_unit` in, `to_uint8` out): the range DDPM's
  noise schedule assumes, and the one x0 clipping clips to.
- A file is read with Pillow, converted to RGB (or L), centre-cropped to a square (paper §4.1: "centre-crop")
  and resized with antialiased bicubic (`RESAMPLE`); in-memory tensors use the same kernel (`resize`:
  torch's antialiased bicubic matches Pillow's). Bicubic overshoots, so results are clamped back into range.
- An image becomes a sequence of patch vectors in raster order (`patchify`), each patch flattened as (C, k, k);
  `unpatchify` inverts it. Data, decoding and the model's patch encoders all use these two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

RESAMPLE = Image.Resampling.BICUBIC


class ImageReadError(ValueError):
    """A file that is not a readable image (missing, corrupt, truncated, not an image format)."""


# ------------------------------------------------------------------------------------------ value range


def from_uint8(x: Tensor | np.ndarray) -> Tensor:
    """uint8 [0, 255] (any shape) -> float32 [-1, 1]."""
    return torch.as_tensor(np.asarray(x)).float().div(127.5).sub(1.0)


def from_unit(x: Tensor) -> Tensor:
    """float [0, 1] -> [-1, 1], clamped."""
    return x.mul(2.0).sub(1.0).clamp(-1.0, 1.0)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, for PNGs and scorers."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------------------------------ resizing


def center_crop(im: Image.Image) -> Image.Image:
    """The largest centred square of `im`."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im if w == h else im.crop((left, top, left + s, top + s))


def resize(x: Tensor, size: int) -> Tensor:
    """(N, C, H, W) float -> (N, C, size, size), antialiased bicubic (Pillow's kernel), no-op at the size."""
    if x.shape[-2:] == (size, size):
        return x
    lo, hi = float(x.min()), float(x.max())  # bicubic overshoots: stay inside the input's own range
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(lo, hi)


def read_uint8(path: str | Path, size: int, channels: int = 3) -> np.ndarray:
    """An image file -> (channels, size, size) uint8, centre-cropped and resized. ImageReadError if unreadable."""
    if channels not in (1, 3):
        raise ValueError(f"image files have 1 or 3 channels, not {channels}")
    try:
        with Image.open(path) as im:
            im.load()  # decode fully now, so a truncated file fails here
            im = center_crop(im.convert("RGB" if channels == 3 else "L"))
            if im.size != (size, size):
                im = im.resize((size, size), RESAMPLE)
            arr = np.array(im, dtype=np.uint8)  # a copy: asarray's is read-only, and torch warns on it (fuzzing)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise ImageReadError(f"cannot read image {path}: no such file") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (C, H, W)


def read_image(path: str | Path, size: int, channels: int = 3) -> Tensor:
    """An image file -> (channels, size, size) float in [-1, 1]. ImageReadError if unreadable."""
    return from_uint8(read_uint8(path, size, channels))


# ------------------------------------------------------------------------------------------ patches


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
