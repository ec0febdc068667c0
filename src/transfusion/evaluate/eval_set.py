"""What the suite evaluates on, for any dataset: prompts with their labels, the matched real test images, the
reference phrasings, and the pool of the dataset's captions that retrieval ranks among.

A dataset with evaluation hooks (Dataset.eval_prompts, reference_images, caption_references) says all of it
itself; one without them (a user folder) gets the same from its test split: `n` test examples drawn by seed,
their first caption phrasing as the prompt, their own image as the real reference, every phrasing of their
caption as CIDEr's references, and no attribute labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from transfusion.data.dataset import Dataset, EvalPrompts
from transfusion.data.image_text import ImageTextSet


@dataclass
class EvalSet:
    prompts: list[str]  # (N) captions to draw / the truth of real images
    labels: dict[str, Tensor]  # attribute -> (N,) long, -1 = not asked; {} when the dataset has no attributes
    heldout: Tensor  # (N,) bool: a combination never trained on
    real: Tensor | None  # (N, 3, S, S) in [-1, 1] real test images matching the prompts, or None
    references: list[list[str]] = field(default_factory=list)  # (N) every phrasing of each prompt's caption
    reasons: dict[str, str] = field(default_factory=dict)  # what is missing and why


class EvalSplit:
    """The dataset's test split, loaded on first use (the hooks may make it unnecessary)."""

    def __init__(self, ds: Dataset, tokenizer, image_size: int) -> None:
        self.ds, self.tok, self.size = ds, tokenizer, image_size
        self._set: ImageTextSet | None = None
        self._texts: list[list[str]] | None = None

    @property
    def images(self) -> ImageTextSet:
        if self._set is None:
            self._set, _ = self.ds.image_set(self.tok, "test", self.size, 3)
        return self._set

    def texts(self) -> list[list[str]]:
        """Every phrasing of every caption set, decoded (index = caption set id)."""
        if self._texts is None:
            self._texts = [[self.tok.decode(ids.tolist()) for ids in alts] for alts in self.images.caption_sets]
        return self._texts

    def caption_pool(self) -> list[str]:
        """The dataset's distinct captions (first phrasing of each caption set used by a test image)."""
        used = np.unique(self.images.caption_of)
        return sorted({self.texts()[int(s)][0] for s in used if self.texts()[int(s)]})


def from_test_split(test: EvalSplit, n: int, seed: int) -> EvalSet:
    """`n` test examples (repeating only when the split is smaller) as prompts with their own images."""
    rng = np.random.default_rng(seed)
    m = len(test.images)
    idx = rng.permutation(m)[:n] if n <= m else rng.choice(m, size=n, replace=True)
    texts = test.texts()
    sets = test.images.caption_of[idx]
    return EvalSet(prompts=[texts[int(s)][0] for s in sets], labels={}, heldout=torch.zeros(len(idx), dtype=torch.bool),
                   real=test.images.render(idx), references=[list(texts[int(s)]) for s in sets])


def build_eval_set(ds: Dataset, test: EvalSplit, n: int, seed: int, heldout_share: float) -> EvalSet:
    """The hooks' prompts, references and real images when the dataset has them, else its test split's."""
    prompts: EvalPrompts | None = ds.eval_prompts(n, seed, heldout_share)
    if prompts is None:
        return from_test_split(test, n, seed)
    out = EvalSet(prompts=list(prompts.prompts), labels=dict(prompts.labels), heldout=prompts.heldout.bool(),
                  real=ds.reference_images(prompts, seed, test.size), references=[])
    if out.real is None:
        out.reasons["real"] = f"the {ds.name} dataset gives no real reference images (Dataset.reference_images)"
    out.references = ds.caption_references(prompts.labels) or []
    if not out.references:
        out.reasons["references"] = f"the {ds.name} dataset gives no caption references (Dataset.caption_references)"
    return out
