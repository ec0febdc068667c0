"""Real reference images: tinted Fashion-MNIST *test* images matched to a list of prompts.

FID and fd_classifier compare generated images against real ones with the same item/colour mix, so a generator
is not penalised for the prompt distribution itself. The same images "scored as if generated" calibrate the
scorers (tests/test_eval_calibration.py): they set the ceiling every generator is measured against.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from transfusion.data import fashion


def eval_prompts(n: int, seed: int = 0, heldout_share: float | None = None) -> tuple[Tensor, Tensor]:
    """n (item, colour) prompts, each (n,): items cycle over the 10 classes, colours over the 8, shuffled.

    With `heldout_share`, that share of prompts is drawn from fashion.HELDOUT (so held-out alignment is always
    measured); otherwise combinations are uniform over all 80 and held-out ones appear ~10% of the time.
    """
    gen = torch.Generator().manual_seed(seed)
    combos = torch.tensor([(i, c) for i in range(len(fashion.ITEMS)) for c in range(len(fashion.COLOUR_NAMES))])
    idx = torch.arange(n) % len(combos)
    idx = idx[torch.randperm(n, generator=gen)]
    items, colours = combos[idx, 0].clone(), combos[idx, 1].clone()
    if heldout_share:
        held = torch.tensor(sorted(fashion.HELDOUT))
        k = int(round(n * heldout_share))
        pick = held[torch.arange(k) % len(held)]
        items[:k], colours[:k] = pick[:, 0], pick[:, 1]
    return items, colours


def real_images(items: Tensor, colours: Tensor, seed: int = 0, size: int = 28,
                source: tuple[np.ndarray, np.ndarray] | None = None) -> Tensor:
    """Real test images of items[i] tinted colours[i]: (N, 3, size, size) in [-1, 1], no image used twice
    until the class runs out (1,000 test images per class). `source` = (gray uint8 (M, 28, 28), items (M,)) to
    draw from instead of the full Fashion-MNIST test split (e.g. the committed subset's)."""
    images, labels = source if source is not None else fashion.load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    pools = {k: rng.permutation(np.flatnonzero(labels == k)) for k in range(len(fashion.ITEMS))}
    used = {k: 0 for k in pools}
    picks = []
    for item in np.asarray(items).tolist():
        pool = pools[int(item)]
        picks.append(pool[used[int(item)] % len(pool)])
        used[int(item)] += 1
    if not picks:
        return torch.zeros(0, 3, size, size)
    return fashion.tint(images[np.array(picks)], np.asarray(colours), size=size)
