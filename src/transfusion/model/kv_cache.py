"""Preallocated key/value cache for decoding (paper §3 "Inference").

Keys and values of every layer live in one buffer of `max_len` positions; `length` counts the committed
prefix. A forward pass writes its keys/values right after the prefix and attends to prefix + itself. With
`commit=True` the prefix grows (LM decoding); with `commit=False` it does not, so the next call overwrites the
same slots — exactly what a diffusion step needs: the text prefix is computed once and each of the T denoising
steps only runs the n image positions.

The cache also keeps each position's image id and document id so the attention mask for a suffix query is
built from the same rule as the full mask (model/masks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (n_layers, B, H, S_max, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.image_ids = torch.full((batch, max_len), -1, dtype=torch.long, device=device)  # (B, S_max)
        self.doc_ids = torch.full((batch, max_len), -1, dtype=torch.long, device=device)  # (B, S_max)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def begin(self, image_ids: Tensor, doc_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Register the metadata of the next `n` positions; return (B, length + n) views for the mask."""
        n = image_ids.shape[1]
        end = self.length + n
        if image_ids.shape[0] != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows, got a batch of {image_ids.shape[0]}")
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} positions > max_len {self.max_len}")
        self.image_ids[:, self.length : end] = image_ids
        self.doc_ids[:, self.length : end] = doc_ids
        return self.image_ids[:, :end], self.doc_ids[:, :end]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this layer's new keys/values (B, H, n, hd); return all keys/values (B, H, length + n, hd)."""
        k_slot, v_slot = self.slots(layer, k.shape[2])
        k_slot.copy_(k)
        v_slot.copy_(v)
        return self.keys_values(layer, k.shape[2])

    def slots(self, layer: int, n: int) -> tuple[Tensor, Tensor]:
        """Views of this layer's next n key/value slots (B, H, n, hd), for a forward to write into directly."""
        end = self.length + n
        return self.k[layer, :, :, self.length : end], self.v[layer, :, :, self.length : end]

    def keys_values(self, layer: int, n: int) -> tuple[Tensor, Tensor]:
        """All keys/values of this layer up to the n positions after the prefix: (B, H, length + n, hd)."""
        end = self.length + n
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n: int) -> None:
        self.length += n

    def select_rows(self, rows: Tensor) -> None:
        """Keep only some rows (e.g. drop finished prompts)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.image_ids = self.image_ids[rows]
        self.doc_ids = self.doc_ids[rows]
