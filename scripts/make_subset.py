"""Write src/transfusion/assets/fashion_subset.npz: a small, class-balanced slice of Fashion-MNIST (MIT).

Tests and CI use it so they never need the network or the Debian package; `make demo` falls back to it when
the full dataset cannot be installed. Each image keeps its index in the original split, so it gets the same
colour as in the full dataset (colours are a function of the index, data/colour_fashion.py).

    .venv/bin/python scripts/make_subset.py [--train-per-class 300] [--test-per-class 100]

Needs the full dataset (`sudo apt-get install dataset-fashion-mnist`). Deterministic (fixed seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from transfusion.data.colour_fashion import SUBSET_PATH
from transfusion.data.fashion import load_fashion_mnist

SEED = 20240811  # arXiv 2408.11039


def pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` random indices of every class, returned sorted (original order)."""
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(int(labels.max()) + 1)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--out", type=Path, default=SUBSET_PATH)
    args = ap.parse_args()
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = load_fashion_mnist(split)
        idx = pick(labels, per_class, rng)
        arrays[f"{split}_images"] = images[idx].astype(np.uint8)  # (n, 28, 28)
        arrays[f"{split}_labels"] = labels[idx].astype(np.uint8)  # (n,)
        arrays[f"{split}_index"] = idx.astype(np.int32)  # (n,) index in the full split
    np.savez_compressed(args.out, **arrays)
    sizes = ", ".join(f"{s}: {len(arrays[f'{s}_labels'])}" for s in ("train", "test"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB; {sizes})")


if __name__ == "__main__":
    main()
