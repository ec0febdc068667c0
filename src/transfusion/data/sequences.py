"""Documents: how one example becomes a token sequence with an image span (paper §3, §4.1, §4.3.4).

    caption first (p = 1 - image_first_prob):  BOS caption BOI patches EOI EOS        image max t = T-1
    image first   (p = image_first_prob):      BOS BOI patches EOI caption EOS        image max t = noise limit
    caption dropped (p = caption_dropout):     BOS BOI patches EOI EOS                image max t = T-1
    text only:                                 BOS text [EOS]

Image-first images get at most `noise_limit` noise (paper §4.3.4: an image followed by its caption should stay
legible so the caption loss teaches captioning). Caption dropout gives the model an unconditional mode for
classifier-free guidance; there is no caption to condition, so there is no noise limit either.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from transfusion.tokenizer import Tokenizer

PATCH = -1  # placeholder token id at image patch positions (replaced by PAD in the batch)


class Layout(str, enum.Enum):
    TEXT = "text"
    CAPTION_FIRST = "caption_first"
    IMAGE_FIRST = "image_first"
    UNCONDITIONAL = "unconditional"  # caption dropped


@dataclass(frozen=True)
class Specials:
    """The special-token ids a document needs (read once from the tokenizer)."""

    pad: int
    bos: int
    eos: int
    boi: int
    eoi: int

    @classmethod
    def of(cls, tok: Tokenizer) -> "Specials":
        return cls(tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id)


@dataclass
class Document:
    tokens: np.ndarray  # (n,) int64 token ids; PATCH at image positions
    layout: Layout
    image: int = -1  # index of the image in its ImageTextSet, -1 for text
    image_start: int = -1  # position of the first patch within the document
    max_t: int = -1  # largest diffusion timestep the image may get

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def splittable(self) -> bool:
        """Only text may be cut at a row end; an image and its caption always stay together."""
        return self.layout is Layout.TEXT

    def truncated(self, n: int) -> "Document":
        if not self.splittable:
            raise ValueError("an image document cannot be truncated")
        return Document(self.tokens[:n], self.layout)


def choose_layout(rng: np.random.Generator, image_first_prob: float, caption_dropout: float) -> Layout:
    """Draw the layout of an image-caption example: dropout first, then the 80/20 order among the rest."""
    if rng.random() < caption_dropout:
        return Layout.UNCONDITIONAL
    return Layout.IMAGE_FIRST if rng.random() < image_first_prob else Layout.CAPTION_FIRST


def image_document(caption: np.ndarray, image: int, n_patches: int, layout: Layout, sp: Specials,
                   num_train_steps: int, noise_limit: int) -> Document:
    """Lay out one image-caption example (see the module docstring)."""
    patches = np.full(n_patches, PATCH, dtype=np.int64)
    img = np.concatenate([[sp.boi], patches, [sp.eoi]])
    cap = np.asarray(caption, dtype=np.int64)
    max_t = num_train_steps - 1
    if layout is Layout.CAPTION_FIRST:
        body = [cap, img]
    elif layout is Layout.IMAGE_FIRST:
        body, max_t = [img, cap], min(noise_limit, num_train_steps - 1)
    elif layout is Layout.UNCONDITIONAL:
        body = [img]
    else:
        raise ValueError(f"{layout} is not an image layout")
    tokens = np.concatenate([[sp.bos], *body, [sp.eos]]).astype(np.int64)
    start = 1 + (len(cap) if layout is Layout.CAPTION_FIRST else 0) + 1  # after BOS, caption?, BOI
    return Document(tokens, layout, image=image, image_start=start, max_t=max_t)


def text_document(text: np.ndarray, sp: Specials, complete: bool = True) -> Document:
    """`BOS text EOS`; without EOS when the text was cut mid-way (`complete=False`), so EOS is only learnt
    where a passage really ends."""
    parts = [[sp.bos], np.asarray(text, dtype=np.int64)] + ([[sp.eos]] if complete else [])
    return Document(np.concatenate(parts).astype(np.int64), Layout.TEXT)
