"""Packing documents into fixed-length rows, and turning rows into a MixedBatch (layout in batch.py).

Rules (so attention, positions and losses never mix documents):
- each document gets its own doc id within the row, and positions restart at 0 for every document;
- an image document (one image, or several interleaved with text) is never split: if it does not fit in what
  is left of a row, it moves whole to the next row and the gap is filled with a text passage (or padding when
  no text fits);
- text-only documents may be cut at the row end;
- what is left at the end of a row is one padding document of PAD tokens that is never an LM target;
- the EOS of a caption-dropped document (`BOS BOI image EOI EOS`, for CFG) is not an LM target either: the
  document teaches the unconditional image, and its EOS would teach captioning to write nothing;
- every image gets its own batch image index (reading order), so its own timestep and its own bidirectional
  attention span, also when a document holds several.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from transfusion.batch import MixedBatch, make_lm_targets
from transfusion.data.image_text import ImageTextSet
from transfusion.data.sequences import Document, Layout


class DocumentSource(Protocol):
    def next(self, room: int) -> Document | None: ...

    def text(self, room: int) -> Document | None: ...


def pack_rows(source: DocumentSource, n_rows: int, seq_len: int) -> list[list[Document]]:
    """Greedily fill `n_rows` rows of `seq_len` positions with documents from `source`."""
    rows: list[list[Document]] = []
    carry: Document | None = None
    for _ in range(n_rows):
        row: list[Document] = []
        room = seq_len
        if carry is not None:
            row.append(carry)
            room -= len(carry)
            carry = None
        while room > 0:
            doc = source.next(room)
            if doc is None:
                break  # only padding fits
            if len(doc) > seq_len and not doc.splittable:
                raise ValueError(
                    f"an image document of {len(doc)} positions cannot fit a row of data.seq_len={seq_len}; "
                    "raise data.seq_len or lower data.max_caption_tokens"
                )
            if len(doc) <= room:
                row.append(doc)
                room -= len(doc)
            elif doc.splittable:
                row.append(doc.truncated(room))
                room = 0
            else:  # an image never straddles rows: it opens the next row, the gap gets text or padding
                carry = doc
                filler = source.text(room)
                if filler is not None:
                    row.append(filler if len(filler) <= room else filler.truncated(room))
                break
        rows.append(row)
    return rows


def collate(rows: list[list[Document]], seq_len: int, pad_id: int, images: ImageTextSet | None,
            patch_size: int, channels: int = 3) -> MixedBatch:
    """Rows of documents -> MixedBatch; images are rendered and patchified here, only for these rows."""
    B, L = len(rows), seq_len
    tokens = np.full((B, L), pad_id, dtype=np.int64)
    image_ids = np.full((B, L), -1, dtype=np.int64)
    doc_ids = np.zeros((B, L), dtype=np.int64)
    positions = np.zeros((B, L), dtype=np.int64)
    picked: list[int] = []  # (N,) ImageTextSet index of batch image k
    max_t: list[int] = []  # (N,) largest timestep of batch image k
    no_target = np.zeros((B, L), dtype=bool)  # target tokens that are not learnt (besides PAD)
    for b, row in enumerate(rows):
        at = 0
        for d, doc in enumerate(row):
            n = len(doc)
            tokens[b, at:at + n] = doc.tokens
            if doc.layout is Layout.UNCONDITIONAL:
                # `BOS BOI image EOI EOS` exists for the image's unconditional diffusion (CFG); as an LM target
                # its EOS would teach "nothing follows an image", which greedy captioning then prefers to any
                # caption whose first token is spread over many words (measured: empty emoji captions)
                no_target[b, at + n - 1] = True
            doc_ids[b, at:at + n] = d
            positions[b, at:at + n] = np.arange(n)
            n_patch = doc.patches_per_image
            for k, start, mt in zip(doc.images, doc.image_starts, doc.max_ts):
                image_ids[b, at + start:at + start + n_patch] = len(picked)
                picked.append(k)
                max_t.append(mt)
            at += n
        if at < L:  # the padding document
            doc_ids[b, at:] = len(row)
            positions[b, at:] = np.arange(L - at)
    tokens[image_ids >= 0] = pad_id
    t = {k: torch.from_numpy(v) for k, v in
         dict(tokens=tokens, image_ids=image_ids, doc_ids=doc_ids, positions=positions).items()}
    if picked:
        assert images is not None
        patches = images.patches(np.asarray(picked), patch_size)  # (P, D): image k after k-1, raster order
    else:
        patches = torch.zeros(0, channels * patch_size**2)
    loss_mask = (t["tokens"] != pad_id) & ~torch.from_numpy(no_target)  # PAD is never a target
    return MixedBatch(
        tokens=t["tokens"], image_ids=t["image_ids"], doc_ids=t["doc_ids"], positions=t["positions"],
        lm_targets=make_lm_targets(t["tokens"], t["image_ids"], t["doc_ids"], loss_mask),
        patches=patches.contiguous(), image_max_t=torch.tensor(max_t, dtype=torch.long),
    )
