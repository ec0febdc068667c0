"""Colour fashion: real Fashion-MNIST items (MIT licence, Zalando) tinted with one of 8 colours on black.

This module is the single definition of the items, colours, captions and held-out combinations; the data
pipeline, the demo and the evaluation scorers all read them from here.

Source images come from the Debian package `dataset-fashion-mnist` (four IDX .gz files) or any folder holding
the same files (`TRANSFUSION_FASHION_DIR`, see env.py). Train/test split follows Fashion-MNIST's own.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from transfusion.env import fashion_dir_override
from transfusion.images import from_unit, resize

ITEMS: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# RGB in [0, 1]; saturated, well-separated hues so colour can be read back exactly (evaluate/alignment.py)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.0),
    "yellow": (1.0, 0.95, 0.1),
    "green": (0.1, 0.85, 0.15),
    "cyan": (0.0, 0.9, 0.95),
    "blue": (0.15, 0.3, 1.0),
    "purple": (0.7, 0.2, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# (item index, colour index) pairs never seen in training: 8 of the 80 combinations (10%), one per colour and
# item-diverse, used as held-out prompts for compositional generalisation.
HELDOUT: frozenset[tuple[int, int]] = frozenset({
    (3, 0),  # red dress
    (7, 1),  # orange sneaker
    (8, 2),  # yellow bag
    (4, 3),  # green coat
    (5, 4),  # cyan sandal
    (1, 5),  # blue trouser
    (9, 6),  # purple ankle boot
    (2, 7),  # white pullover
})

TEMPLATES: tuple[str, ...] = (
    "{a} {colour} {item}",
    "{a} photo of {a} {colour} {item}",
    "{colour} {item} on black",
    "{a} picture of {a} {colour} {item}",
    "{a} {colour} {item} on a black background",
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissing(FileNotFoundError):
    """Fashion-MNIST is not installed; the message says how to get it."""


def caption(item: int, colour: int, template: int = 0) -> str:
    """e.g. caption(7, 0) -> 'a red sneaker'; 'an' before a vowel sound ('an orange bag')."""
    colour_name, item_name = COLOUR_NAMES[colour], ITEMS[item]
    text = TEMPLATES[template].format(a="{a}", colour=colour_name, item=item_name)
    # the article agrees with the word that follows it
    parts = text.split("{a}")
    out = parts[0]
    for rest in parts[1:]:
        nxt = rest.lstrip()
        out += ("an" if nxt[:1] in "aeiou" else "a") + rest
    return out


def all_captions(item: int, colour: int) -> list[str]:
    """Every reference phrasing of one combination (CIDEr references, ranked classification)."""
    return [caption(item, colour, k) for k in range(len(TEMPLATES))]


def fashion_dir() -> Path | None:
    for d in (fashion_dir_override(), DEBIAN_DIR):
        if d and all((Path(d) / f).is_file() for pair in FILES.values() for f in pair):
            return Path(d)
    return None


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {body.size} (truncated?)")
    return body.reshape(dims)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) for split 'train' (60k) or 'test' (10k)."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = fashion_dir()
    if root is None:
        raise DatasetMissing(
            "Fashion-MNIST not found. Install it with `sudo apt-get install dataset-fashion-mnist` "
            f"(files land in {DEBIAN_DIR}), or set TRANSFUSION_FASHION_DIR to a folder holding "
            f"{', '.join(f for pair in FILES.values() for f in pair)}."
        )
    img_file, lbl_file = FILES[split]
    images = _read_idx(root / img_file)
    labels = _read_idx(root / lbl_file).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def colour_table() -> Tensor:
    """(8, 3) float RGB of COLOURS in COLOUR_NAMES order."""
    return torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32)


def tint(gray: Tensor | np.ndarray, colour: Tensor | np.ndarray, size: int = 28) -> Tensor:
    """Tint grayscale items with colours: (N, 28, 28) uint8 + (N,) colour ids -> (N, 3, size, size) in [-1, 1].

    The item's intensity scales the colour, the background stays black; `size` != 28 resizes by the project's
    one rule (images.resize)."""
    g = resize(torch.as_tensor(np.array(gray)).float().div(255.0).unsqueeze(1), size)  # (N, 1, size, size)
    rgb = colour_table()[torch.as_tensor(np.asarray(colour)).long()]  # (N, 3)
    return from_unit(g * rgb[:, :, None, None])
