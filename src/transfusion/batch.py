"""The mixed-modal batch: what the data pipeline produces and the model consumes.

A row is a packed sequence of documents, each `BOS text BOI patches... EOI text ... EOS` (paper §3, Fig. 1).
Image patches occupy sequence positions like tokens do; their vectors live in one flat `patches` tensor in
reading order (row by row, left to right), so any number of images can sit anywhere in any row.

    tokens      (B, L) long   text token ids; PAD at patch positions (ignored there)
    image_ids   (B, L) long   -1 for text, k >= 0 for the positions of image k (k indexes images in the batch)
    doc_ids     (B, L) long   document index within its row; attention never crosses documents
    positions   (B, L) long   RoPE positions, restarting at 0 for every document
    lm_targets  (B, L) long   next-token target per position or IGNORE (-100): see `make_lm_targets`
    patches     (P, D) float  clean image patches, P = number of positions with image_ids >= 0
    image_max_t (N,) long     largest diffusion timestep image k may get (T-1, or the noise limit, §4.3.4);
                              CLEAN (-1): a conditioning image, given clean at t = 0 with no diffusion loss
                              (the input image of an edit, §4.5)

Every image in a batch has `patches_per_image` patches (fixed by the model config); `validate` checks the
layout and names what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

IGNORE = -100  # cross-entropy ignore index: no LM loss at this position
CLEAN = -1  # image_max_t of a clean conditioning image: x_t = x_0 at t = 0, and it is no diffusion target


class BatchError(ValueError):
    """A batch whose layout is inconsistent (spans, shapes, ids)."""


@dataclass
class MixedBatch:
    tokens: Tensor
    image_ids: Tensor
    doc_ids: Tensor
    positions: Tensor
    lm_targets: Tensor
    patches: Tensor
    image_max_t: Tensor

    @property
    def num_images(self) -> int:
        return int(self.image_max_t.numel())

    @property
    def diffused(self) -> Tensor:
        """(N,) bool: the images that are noised and are diffusion targets (all but CLEAN ones)."""
        return self.image_max_t != CLEAN

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "MixedBatch":
        return MixedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def validate(self, patch_dim: int, patches_per_image: int, vocab_size: int | None = None) -> None:
        """Raise BatchError naming the first inconsistency; cheap enough to run on every batch."""
        B, L = self.tokens.shape
        for name in ("image_ids", "doc_ids", "positions", "lm_targets"):
            t = getattr(self, name)
            if tuple(t.shape) != (B, L):
                raise BatchError(f"{name} has shape {tuple(t.shape)}, expected {(B, L)} like tokens")
        is_img = self.image_ids >= 0
        n_pos = int(is_img.sum())
        if self.patches.dim() != 2 or self.patches.shape[1] != patch_dim:
            raise BatchError(f"patches has shape {tuple(self.patches.shape)}, expected (P, {patch_dim})")
        if self.patches.shape[0] != n_pos:
            raise BatchError(
                f"patches holds {self.patches.shape[0]} patch vectors but image_ids declares {n_pos} "
                "image positions: the declared image spans do not fit the patches"
            )
        n_img = self.num_images
        if n_pos:
            ids = self.image_ids[is_img]
            if int(ids.max()) >= n_img:
                raise BatchError(f"image_ids refers to image {int(ids.max())} but image_max_t has {n_img} entries")
            counts = torch.bincount(ids, minlength=n_img)
            bad = (counts != patches_per_image).nonzero()
            if bad.numel():
                k = int(bad[0])
                raise BatchError(
                    f"image {k} spans {int(counts[k])} positions, expected {patches_per_image} patches per image"
                )
            # each image must be one contiguous span inside one row and one document
            flat_ids = torch.where(is_img, self.image_ids, -1)
            starts = is_img & torch.cat([torch.ones_like(is_img[:, :1]), flat_ids[:, 1:] != flat_ids[:, :-1]], 1)
            if int(starts.sum()) != n_img:
                raise BatchError("an image's positions are not one contiguous span (split or spread across rows)")
            same_doc = torch.zeros(n_img, dtype=torch.long).scatter_reduce(
                0, ids, self.doc_ids[is_img], "amax", include_self=False
            ) == torch.zeros(n_img, dtype=torch.long).scatter_reduce(
                0, ids, self.doc_ids[is_img], "amin", include_self=False
            )
            if not bool(same_doc.all()):
                raise BatchError("an image spans two documents")
        elif n_img:
            raise BatchError(f"image_max_t has {n_img} entries but no position is an image")
        if n_img and int(self.image_max_t.min()) < CLEAN:
            raise BatchError(f"image_max_t holds {int(self.image_max_t.min())}: expected >= 0, or CLEAN ({CLEAN})")
        if vocab_size is not None:
            text = self.tokens[~is_img]
            if text.numel() and (int(text.min()) < 0 or int(text.max()) >= vocab_size):
                raise BatchError(
                    f"token id {int(text.max())} outside the model vocabulary of {vocab_size}: "
                    "the tokenizer and model.vocab_size disagree"
                )


def make_lm_targets(tokens: Tensor, image_ids: Tensor, doc_ids: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Next-token targets: position i predicts token i+1 when both are text in the same document.

    No loss where the next position is an image patch, which covers the paper's rule of no loss when the
    *input* is BOI (fn. 8: the position after BOI is the first patch), nor on patch positions themselves.
    `loss_mask` (B, L) bool, if given, additionally marks which *target* tokens count (e.g. not PAD).
    """
    targets = torch.full_like(tokens, IGNORE)
    ok = (image_ids[:, :-1] < 0) & (image_ids[:, 1:] < 0) & (doc_ids[:, :-1] == doc_ids[:, 1:])
    if loss_mask is not None:
        ok &= loss_mask[:, 1:]
    targets[:, :-1] = torch.where(ok, tokens[:, 1:], IGNORE)
    return targets
