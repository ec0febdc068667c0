"""A set of images with caption alternatives: the common form of every image-caption dataset.

Images are kept compact (uint8) and rendered to float only for the images a batch actually uses, so a
60k-image dataset costs ~50 MB and a batch renders ~100 images in well under a millisecond. Colour fashion
stores gray items plus a colour id per image and tints on render; a user folder stores RGB pixels.
Captions are tokenized once: `caption_sets[caption_of[i]]` lists the token-id alternatives of image i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from transfusion.data.fashion import tint


@dataclass
class ImageTextSet:
    pixels: Tensor  # (N, C, H, W) uint8; C == 1 with `colours` set -> gray items tinted on render
    caption_of: np.ndarray  # (N,) int64 index into caption_sets
    caption_sets: list[list[np.ndarray]]  # caption alternatives, each (n_tokens,) int64 without specials
    image_size: int  # rendered images are image_size x image_size
    colours: Tensor | None = None  # (N,) long colour ids (colour fashion)
    labels: np.ndarray | None = None  # (N,) item ids when known (colour fashion)
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.caption_of) != len(self.pixels):
            raise ValueError(f"{len(self.pixels)} images but {len(self.caption_of)} caption indices")
        if self.colours is not None and self.pixels.shape[1] != 1:
            raise ValueError("tinted sets store gray pixels (N, 1, H, W)")

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def render(self, idx: Tensor | np.ndarray) -> Tensor:
        """Images `idx` as float (n, 3, image_size, image_size) in [-1, 1]."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        px = self.pixels[idx]
        if self.colours is not None:
            return tint(px[:, 0].numpy(), self.colours[idx].numpy(), self.image_size)
        x = px.float().div(127.5).sub(1.0)
        if x.shape[-1] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return x

    def max_caption_len(self) -> int:
        return max((len(c) for alts in self.caption_sets for c in alts), default=0)
