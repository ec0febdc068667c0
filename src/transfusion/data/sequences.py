"""Documents: how one example becomes a token sequence with image spans (paper §3, §4.1, §4.3.4).

    caption first (p = 1 - image_first_prob):  BOS caption BOI patches EOI EOS        image max t = T-1
    image first   (p = image_first_prob):      BOS BOI patches EOI caption EOS        image max t = noise limit
    caption dropped (p = caption_dropout):     BOS BOI patches EOI EOS                image max t = T-1
    interleaved (p = data.interleaved_prob):   BOS text BOI patches EOI text BOI patches EOI EOS
                                                                                      each image max t = T-1
    text only:                                 BOS text [EOS]

Image-first images get at most `noise_limit` noise (paper §4.3.4: an image followed by its caption should stay
legible so the caption loss teaches captioning). Caption dropout gives the model an unconditional mode for
classifier-free guidance; there is no caption to condition, so there is no noise limit either.

An interleaved document ("two items: a red sneaker <image> and a blue bag <image>") holds several images, each
introduced by the text before it (its caption inside a template) and each with its own timestep. It teaches
the model to emit BOI itself after text and to go on writing after EOI. Its images get the full range T-1, not
the noise limit: the limit exists for an image that comes before the text describing it, and here the text
after an image describes the *next* image, so nothing downstream needs the image legible to learn from it
(a template that described an image after it would have to give that image the noise limit).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from transfusion.tokenizer import Tokenizer

PATCH = -1  # placeholder token id at image patch positions (replaced by PAD in the batch)


class Layout(str, enum.Enum):
    TEXT = "text"
    CAPTION_FIRST = "caption_first"
    IMAGE_FIRST = "image_first"
    UNCONDITIONAL = "unconditional"  # caption dropped
    INTERLEAVED = "interleaved"  # text, image, text, image: several images in one document
    EDIT = "edit"  # instruction, clean input image, diffused output image (paper §4.5; data/edits.py)


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
    images: tuple[int, ...] = ()  # index in its ImageTextSet of each image, in reading order; () for text
    image_starts: tuple[int, ...] = ()  # position of each image's first patch within the document
    max_ts: tuple[int, ...] = ()  # largest diffusion timestep each image may get

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.image_starts) == len(self.max_ts):
            raise ValueError("a document needs one start and one max t per image")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def patches_per_image(self) -> int:
        """Patch positions of each image (every image of a document has the same size); 0 for text."""
        return int((self.tokens == PATCH).sum()) // len(self.images) if self.images else 0

    def _only(self, values: tuple[int, ...]) -> int:
        if len(values) > 1:
            raise ValueError(f"a {self.layout.value} document has {len(values)} images: read `images`")
        return values[0] if values else -1

    @property
    def image(self) -> int:
        """The image of a one-image document; -1 for text."""
        return self._only(self.images)

    @property
    def image_start(self) -> int:
        return self._only(self.image_starts)

    @property
    def max_t(self) -> int:
        return self._only(self.max_ts)

    @property
    def splittable(self) -> bool:
        """Only text may be cut at a row end; an image document (every image and its text) stays together."""
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
    return Document(tokens, layout, images=(image,), image_starts=(start,), max_ts=(max_t,))


def interleaved_document(texts: Sequence[np.ndarray], images: Sequence[int], n_patches: int, sp: Specials,
                         num_train_steps: int) -> Document:
    """`BOS texts[0] BOI patches EOI texts[1] BOI patches EOI ... EOS`: text j introduces image j; one text more
    than images puts it after the last image. Every image may get any timestep (see the module docstring)."""
    if len(texts) not in (len(images), len(images) + 1) or not images:
        raise ValueError(f"{len(texts)} texts cannot introduce {len(images)} images")
    patches = np.full(n_patches, PATCH, dtype=np.int64)
    body: list[np.ndarray] = [np.array([sp.bos])]
    starts: list[int] = []
    at = 1
    for j, text in enumerate(texts):
        body.append(np.asarray(text, dtype=np.int64))
        at += len(text)
        if j < len(images):
            body += [np.array([sp.boi]), patches, np.array([sp.eoi])]
            starts.append(at + 1)  # after BOI
            at += n_patches + 2
    tokens = np.concatenate(body + [np.array([sp.eos])]).astype(np.int64)
    max_t = num_train_steps - 1
    return Document(tokens, Layout.INTERLEAVED, images=tuple(int(k) for k in images), image_starts=tuple(starts),
                    max_ts=(max_t,) * len(images))


def text_document(text: np.ndarray, sp: Specials, complete: bool = True) -> Document:
    """`BOS text EOS`; without EOS when the text was cut mid-way (`complete=False`), so EOS is only learnt
    where a passage really ends."""
    parts = [[sp.bos], np.asarray(text, dtype=np.int64)] + ([[sp.eos]] if complete else [])
    return Document(np.concatenate(parts).astype(np.int64), Layout.TEXT)
