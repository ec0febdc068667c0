"""A set of images with caption alternatives: the common form of every image-caption dataset.

Images are kept compact (uint8) and rendered to float only for the images a batch actually uses, so a
60k-image dataset costs ~50 MB. Colour fashion stores gray items plus a colour id per image and tints on
render; a user folder stores RGB pixels. `patches` renders straight to patch vectors in NumPy: it gives the
same numbers as `patchify(render(idx))` (tested), but NumPy runs single-threaded, whereas torch's small
parallel ops stall badly when the 2 cores are shared (2 ranks, or other work): ~1.5 ms vs ~120 ms measured.
Captions are tokenized once: `caption_sets[caption_of[i]]` lists the token-id alternatives of image i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from transfusion.data.fashion import colour_table, tint
from transfusion.model.patch import patchify


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

        self._gray: np.ndarray | None = None  # (N, S, S) float32 in [0, 1], only when tinted and resized
        if self.colours is not None and self.pixels.shape[-1] != self.image_size:
            self._gray = np.concatenate([  # resized once, exactly as fashion.tint resizes
                torch.nn.functional.interpolate(
                    self.pixels[i:i + 4096].float().div(255.0), size=(self.image_size,) * 2,
                    mode="bilinear", align_corners=False,
                )[:, 0].numpy()
                for i in range(0, len(self.pixels), 4096)
            ])
        self._rgb = colour_table().numpy()  # (8, 3) float32

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

    def patches(self, idx: np.ndarray, patch_size: int) -> Tensor:
        """Images `idx` as patch vectors (n * patches_per_image, C*k*k), image by image in raster order."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.colours is not None:
            if self._gray is not None:
                g = self._gray[idx]
            else:
                g = self.pixels.numpy()[idx, 0].astype(np.float32) / np.float32(255.0)  # (n, S, S)
            rgb = self._rgb[self.colours.numpy()[idx]]  # (n, 3)
            x = g[:, None] * rgb[:, :, None, None]  # (n, 3, S, S), as fashion.tint
            x = np.clip(x * np.float32(2.0) - np.float32(1.0), -1.0, 1.0)
        elif self.pixels.shape[-1] == self.image_size:
            x = self.pixels.numpy()[idx].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        else:
            return patchify(self.render(idx), patch_size).reshape(-1, self.pixels.shape[1] * patch_size**2)
        n, C, H, W = x.shape
        k = patch_size
        x = x.reshape(n, C, H // k, k, W // k, k).transpose(0, 2, 4, 1, 3, 5)  # as model.patch.patchify
        return torch.from_numpy(np.ascontiguousarray(x).reshape(n * (H // k) * (W // k), C * k * k))

    def max_caption_len(self) -> int:
        return max((len(c) for alts in self.caption_sets for c in alts), default=0)
