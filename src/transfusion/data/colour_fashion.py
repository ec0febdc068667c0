"""Colour fashion examples: which colour each Fashion-MNIST image gets, and where the images come from.

Every image gets one fixed colour, a hash of (split, index in the original split), so the same image has the
same colour in the full dataset and in the committed subset, on every machine and every rank. Training images
only get colours that keep their (item, colour) out of `fashion.HELDOUT`, so the held-out combinations are
never seen in training; test images use all 8 colours, i.e. all 80 combinations.

Images come from the Debian package (`use_full_dataset = true` and installed) or from the committed subset
`assets/fashion_subset.npz` (scripts/make_subset.py: 300 train + 100 test images per item).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from transfusion.data import fashion
from transfusion.data.image_text import ImageTextSet

SUBSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "fashion_subset.npz"
_SPLIT_SALT = {"train": 0x5EED_0001, "test": 0x5EED_0002}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread, platform-independent hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def allowed_colours(split: str) -> list[np.ndarray]:
    """Per item, the colour ids an image of that split may get (train excludes HELDOUT)."""
    n_col = len(fashion.COLOUR_NAMES)
    if split == "test":
        return [np.arange(n_col) for _ in fashion.ITEMS]
    return [np.array([c for c in range(n_col) if (i, c) not in fashion.HELDOUT]) for i in range(len(fashion.ITEMS))]


def assign_colours(index: np.ndarray, labels: np.ndarray, split: str) -> np.ndarray:
    """(N,) original indices + (N,) item ids -> (N,) colour ids, deterministic per (split, index)."""
    if split not in _SPLIT_SALT:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    h = _mix64(np.asarray(index, dtype=np.uint64) + np.uint64(_SPLIT_SALT[split]) * np.uint64(1 << 32))
    out = np.empty(len(index), dtype=np.int64)
    for item, allowed in enumerate(allowed_colours(split)):
        sel = np.asarray(labels) == item
        out[sel] = allowed[(h[sel] % np.uint64(len(allowed))).astype(np.int64)]
    return out


_warned: set[str] = set()


def _warn_fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        print(f"WARNING: {reason}; using the committed Fashion-MNIST subset {SUBSET_PATH.name} "
              "(300 train + 100 test images per item). For the full 70k images run "
              "`sudo apt-get install dataset-fashion-mnist` (or `make data`).", file=sys.stderr)


@functools.lru_cache(maxsize=4)
def load_split(split: str, use_full_dataset: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,), original indices int64 (N,)) of a split."""
    if use_full_dataset:
        if fashion.fashion_dir() is not None:
            images, labels = fashion.load_fashion_mnist(split)
            return images, labels, np.arange(len(labels), dtype=np.int64)
        _warn_fallback("the full Fashion-MNIST dataset is not installed")
    if not SUBSET_PATH.is_file():
        raise fashion.DatasetMissing(
            f"the committed subset {SUBSET_PATH} is missing (restore it with git, or rebuild it with "
            "`scripts/make_subset.py` after `sudo apt-get install dataset-fashion-mnist`)"
        )
    with np.load(SUBSET_PATH, allow_pickle=False) as z:
        return (z[f"{split}_images"], z[f"{split}_labels"].astype(np.int64), z[f"{split}_index"].astype(np.int64))


def colour_fashion_set(tokenizer, split: str, image_size: int, use_full_dataset: bool) -> ImageTextSet:
    """The colour fashion ImageTextSet of a split; captions of every template, tokenized once."""
    images, labels, index = load_split(split, use_full_dataset)
    colours = assign_colours(index, labels, split)
    n_col = len(fashion.COLOUR_NAMES)
    texts = [fashion.all_captions(i, c) for i in range(len(fashion.ITEMS)) for c in range(n_col)]
    flat = tokenizer.encode_batch([t for alts in texts for t in alts])
    k = len(fashion.TEMPLATES)
    caption_sets = [[np.asarray(ids, dtype=np.int64) for ids in flat[j * k:(j + 1) * k]] for j in range(len(texts))]
    return ImageTextSet(
        pixels=torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1),  # (N, 1, 28, 28)
        caption_of=labels * n_col + colours,
        caption_sets=caption_sets,
        image_size=image_size,
        colours=torch.from_numpy(colours),
        labels=labels,
        name=f"colour_fashion/{split}",
    )


@dataclass
class FashionExamples:
    images: Tensor  # (N, 3, size, size) float in [-1, 1]
    items: Tensor  # (N,) long
    colours: Tensor  # (N,) long
    captions: list[str]  # canonical caption (template 0), e.g. "a red sneaker"


def fashion_examples(split: str = "test", n: int = 160, seed: int = 0, size: int = 28,
                     use_full_dataset: bool = True, combos: set[tuple[int, int]] | None = None) -> FashionExamples:
    """`n` real tinted images of a split for evaluation (captioning, FID, classifier), chosen by `seed`.

    `combos` restricts to those (item, colour) pairs, e.g. `fashion.HELDOUT` on the test split.
    """
    images, labels, index = load_split(split, use_full_dataset)
    colours = assign_colours(index, labels, split)
    pool = np.arange(len(labels))
    if combos is not None:
        pool = pool[np.array([(int(i), int(c)) in combos for i, c in zip(labels, colours)], dtype=bool)]
    if len(pool) == 0:
        raise ValueError(f"no {split} images of the requested combinations")
    pick = np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False)
    return FashionExamples(
        images=fashion.tint(images[pick], colours[pick], size),
        items=torch.from_numpy(labels[pick]),
        colours=torch.from_numpy(colours[pick]),
        captions=[fashion.caption(int(i), int(c)) for i, c in zip(labels[pick], colours[pick])],
    )
