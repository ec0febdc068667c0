"""The images an autoencoder trains and is evaluated on: a dataset split of the project's registry, as an
ImageTextSet (uint8, rendered to [-1, 1] per batch), and a content key for caching latents of it."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from transfusion.config import DataConfig
from transfusion.data.image_text import ImageTextSet


def image_set(data: DataConfig, split: str, image_size: int, channels: int = 3) -> ImageTextSet:
    """Split `split` of `data.dataset` at `image_size` (captions are tokenized too, and ignored)."""
    from transfusion.data.registry import get_dataset
    from transfusion.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(data.tokenizer or None)
    images, _ = get_dataset(data).image_set(tokenizer, split, image_size, channels)
    return images


def spread(n_total: int, n: int) -> Tensor:
    """`n` indices spread evenly over a set of n_total (the same images every time: grids, eval subsets)."""
    n = min(n, n_total)
    return torch.linspace(0, n_total - 1, n).round().long() if n > 0 else torch.zeros(0, dtype=torch.long)


def content_key(images: ImageTextSet, split: str) -> str:
    """sha256 (16 hex digits) of what encoding this set depends on: its pixels, the rendered size and split.
    Rendering is a fixed function of the stored pixels (images.py), so equal keys give equal images."""
    h = hashlib.sha256(f"{images.name}|{split}|{images.image_size}|{tuple(images.pixels.shape)}".encode())
    h.update(images.pixels.contiguous().numpy().tobytes())
    colours = getattr(images, "colours", None)  # colour fashion stores gray pixels + a tint per image
    if isinstance(colours, Tensor):
        h.update(colours.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
