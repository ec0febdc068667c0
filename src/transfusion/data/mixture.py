"""The stream of documents a batch is packed from: text-only and image-caption documents mixed by tokens.

The paper mixes text and image-caption data about 1:1 by tokens (§4.1), counting an image's patch positions
as tokens. Instead of flipping a coin per document (whose token ratio drifts, since a text passage is ~4x
longer than an image document), the sampler keeps a running count and issues whichever kind is behind its
share, so every batch lands on `text_ratio` to within one document.

An image document is an interleaved 2-image document with probability `interleaved_prob` (sequences.py); the
coin is only flipped when that is > 0, so a run without interleaved documents draws exactly what it did before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transfusion.data.image_text import ImageTextSet
from transfusion.data.sequences import (
    Document, Specials, choose_layout, image_document, interleaved_document, text_document,
)
from transfusion.data.text_corpus import TokenCorpus

MIN_TEXT_TOKENS = 4  # shorter gaps at a row end are padded rather than given a scrap of text


@dataclass
class MixtureSpec:
    """What the sampler needs from the config, gathered once (see loader.build_loader)."""

    text_ratio: float
    image_first_prob: float
    caption_dropout: float
    patches_per_image: int
    num_train_steps: int
    noise_limit: int
    max_text_tokens: int  # longest text passage (BOS/EOS excluded)
    interleaved_prob: float = 0.0  # share of image documents that are interleaved 2-image documents


class DocumentSampler:
    """Draws documents from `rng`; `next(room)` never returns text longer than `room`."""

    def __init__(self, rng: np.random.Generator, spec: MixtureSpec, sp: Specials,
                 images: ImageTextSet | None, corpus: TokenCorpus | None):
        if spec.text_ratio > 0 and corpus is None:
            raise ValueError("data.text_ratio > 0 needs a text corpus")
        if spec.text_ratio < 1 and (images is None or len(images) == 0):
            raise ValueError("data.text_ratio < 1 needs images")
        if spec.interleaved_prob > 0 and spec.text_ratio < 1 and images.interleaved is None:  # type: ignore[union-attr]
            raise ValueError("data.interleaved_prob > 0 needs a dataset with interleaved text (InterleavedText)")
        self.rng, self.spec, self.sp, self.images, self.corpus = rng, spec, sp, images, corpus
        self.text_tokens = 0
        self.image_tokens = 0

    def _text_due(self) -> bool:
        r = self.spec.text_ratio
        if r <= 0 or r >= 1:
            return r >= 1
        total = self.text_tokens + self.image_tokens
        if total == 0:
            return bool(self.rng.random() < r)
        return self.text_tokens < r * total

    def next(self, room: int) -> Document | None:
        """The next document; None when only padding fits (`room` too small for any text)."""
        if self._text_due():
            return self.text(room)
        return self.image()

    def text(self, room: int) -> Document | None:
        """A text passage that fits in `room` positions (BOS + text [+ EOS]), or None."""
        if self.corpus is None or room < MIN_TEXT_TOKENS:
            return None
        ids, complete = self.corpus.sample(self.rng, min(self.spec.max_text_tokens, room - 2))
        doc = text_document(ids, self.sp, complete)
        self.text_tokens += len(doc)
        return doc

    def image(self) -> Document:
        """An image document: interleaved with probability interleaved_prob, else one image and its caption."""
        assert self.images is not None
        s = self.spec
        if s.interleaved_prob > 0 and self.rng.random() < s.interleaved_prob:  # no draw at 0: same stream as before
            doc = self.interleaved()
        else:
            k = int(self.rng.integers(len(self.images)))
            alternatives = self.images.caption_sets[int(self.images.caption_of[k])]
            caption = alternatives[int(self.rng.integers(len(alternatives)))]
            layout = choose_layout(self.rng, s.image_first_prob, s.caption_dropout)
            doc = image_document(caption, k, s.patches_per_image, layout, self.sp, s.num_train_steps, s.noise_limit)
        self.image_tokens += len(doc)
        return doc

    def interleaved(self) -> Document:
        """Two images drawn independently, joined by one of the dataset's templates (never caption-dropped:
        the unconditional mode CFG needs comes from the one-image documents)."""
        assert self.images is not None and self.images.interleaved is not None
        a, b = (int(k) for k in self.rng.integers(len(self.images), size=2))
        template = int(self.rng.integers(len(self.images.interleaved)))
        of = self.images.caption_of
        texts = self.images.interleaved.texts(template, int(of[a]), int(of[b]))
        s = self.spec
        return interleaved_document(texts, [a, b], s.patches_per_image, self.sp, s.num_train_steps)
