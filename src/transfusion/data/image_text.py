"""A set of images with caption alternatives: the common form of every image-caption dataset.

Images are kept compact (uint8) and rendered to float only for the images a batch actually uses, so a
60k-image dataset costs ~50 MB. A user folder stores RGB pixels; colour fashion (colour_fashion.py) subclasses
this to store gray items plus a colour id and tint on render. `patches` renders straight to patch vectors in
NumPy: it gives the same numbers as `patchify(render(idx))` (tested), but NumPy runs single-threaded, whereas
torch's small parallel ops stall badly when the 2 cores are shared (2 ranks, or other work): ~1.5 ms vs ~120 ms
measured. Captions are tokenized once: `caption_sets[caption_of[i]]` lists the token-id alternatives of image i.
A dataset may also give the text of interleaved documents (`InterleavedText`, data.interleaved_prob); one that
does not (a user folder) never makes them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from transfusion.images import from_uint8, patchify, resize


@dataclass
class SkipStats:
    """Skipped inputs by reason (`bad_line`, `missing_file`, `unreadable_image`, `empty_caption`,
    `caption_too_long`), with a few example locations per reason for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    used: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return f"data: {self.used} examples used, none skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in sorted(self.counts.items())]
        return f"data: {self.used} examples used, {self.total} skipped: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {"used": self.used, "skipped": dict(self.counts)}


@dataclass
class InterleavedText:
    """The text of 2-image interleaved documents, tokenized once: template j over images a, b reads
    `first[j][caption_of[a]] <image a> then[j][caption_of[b]] <image b>` (sequences.interleaved_document)."""

    first: list[list[np.ndarray]]  # [template][caption set] -> ids of the text before the first image
    then: list[list[np.ndarray]]  # [template][caption set] -> ids of the text between the two images

    def __post_init__(self) -> None:
        if not self.first or len(self.first) != len(self.then):
            raise ValueError("interleaved text needs the same number (> 0) of first and then templates")

    def __len__(self) -> int:
        return len(self.first)

    def texts(self, template: int, a: int, b: int) -> list[np.ndarray]:
        """The two text pieces of `template` for caption sets a (first image) and b (second image)."""
        return [self.first[template][a], self.then[template][b]]

    def max_len(self) -> int:
        """Most text tokens one document can hold (longest first + longest then)."""
        return max(len(x) for t in self.first for x in t) + max(len(x) for t in self.then for x in t)


@dataclass
class ImageTextSet:
    pixels: Tensor  # (N, C, H, W) uint8
    caption_of: np.ndarray  # (N,) int64 index into caption_sets
    caption_sets: list[list[np.ndarray]]  # caption alternatives, each (n_tokens,) int64 without specials
    image_size: int  # rendered images are image_size x image_size
    labels: np.ndarray | None = None  # (N,) class ids when the dataset has them
    name: str = ""
    interleaved: InterleavedText | None = None  # text of interleaved documents, when the dataset has templates

    def __post_init__(self) -> None:
        if len(self.caption_of) != len(self.pixels):
            raise ValueError(f"{len(self.pixels)} images but {len(self.caption_of)} caption indices")

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[1])

    def render(self, idx: Tensor | np.ndarray) -> Tensor:
        """Images `idx` as float (n, C, image_size, image_size) in [-1, 1]."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return resize(from_uint8(self.pixels[idx]), self.image_size)

    def patches(self, idx: np.ndarray, patch_size: int) -> Tensor:
        """Images `idx` as patch vectors (n * patches_per_image, C*k*k), image by image in raster order."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.pixels.shape[-1] != self.image_size:
            return patchify(self.render(idx), patch_size).reshape(-1, self.channels * patch_size**2)
        x = self.pixels.numpy()[idx].astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # = from_uint8
        return numpy_patchify(x, patch_size)

    def max_caption_len(self) -> int:
        return max((len(c) for alts in self.caption_sets for c in alts), default=0)


def numpy_patchify(x: np.ndarray, k: int) -> Tensor:
    """images.patchify in NumPy (single-threaded, see the module docstring): (n, C, H, W) -> (n*(H/k)*(W/k), C*k*k)."""
    n, C, H, W = x.shape
    x = x.reshape(n, C, H // k, k, W // k, k).transpose(0, 2, 4, 1, 3, 5)  # as images.patchify
    return torch.from_numpy(np.ascontiguousarray(x).reshape(n * (H // k) * (W // k), C * k * k))
