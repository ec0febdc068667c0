"""Sample diversity against real images, so that mode collapse (e.g. under strong CFG) cannot pass as quality.

Both measures work in the item classifier's penultimate feature space (tint-invariant: the colour is scored
apart by the alignment reader), on generated images and a real set matched prompt for prompt
(`reference.real_images`):

- `diversity_ratio`: for every prompt (item, colour) with at least two samples, the mean pairwise feature
  distance among its samples; averaged over prompts, divided by the same number for the real images of the same
  prompts. 1.0 = as varied as real; a model that draws one image per prompt scores ~0.
- `precision` / `recall` (Kynkäänniemi et al. 2019, k-nearest-neighbour balls, k = 3): the share of generated
  samples inside the real manifold (fidelity), and of real images inside the generated one (coverage).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def _dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, f), (m, f) -> (n, m) Euclidean distances, without the (n, m, f) difference tensor (the full suite's
    1,000 x 1,000 x 128 would take 1 GB)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _mean_pairwise(feats: np.ndarray) -> float:
    d = _dists(feats, feats)  # (m, m)
    np.fill_diagonal(d, 0.0)
    m = len(feats)
    return float(d.sum() / (m * (m - 1)))


def per_prompt_spread(feats: np.ndarray, items: Tensor, colours: Tensor) -> float | None:
    """Mean over prompts (with >= 2 samples) of the mean pairwise distance among that prompt's samples."""
    keys = items.long() * 1000 + colours.long()
    spreads = [_mean_pairwise(feats[(keys == k).numpy()]) for k in keys.unique() if int((keys == k).sum()) >= 2]
    return float(np.mean(spreads)) if spreads else None


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    d = _dists(feats, feats)
    np.fill_diagonal(d, 0.0)
    return np.sort(d, axis=1)[:, min(k, len(feats) - 1)]  # column 0 is the point itself


def _coverage(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray) -> float:
    d = _dists(points, manifold)  # (n, m)
    return float((d <= radii[None]).any(1).mean())


def precision_recall(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    if len(gen) <= k or len(real) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} generated and real images")
    return _coverage(gen, real, _knn_radii(real, k)), _coverage(real, gen, _knn_radii(gen, k))


def diversity_report(clf, images: Tensor, real: Tensor, items: Tensor, colours: Tensor, k: int = 3) -> dict:
    """images and real (N, C, H, W) in [-1, 1], real[i] matching the prompt (items[i], colours[i])."""
    gen_f, real_f = clf.features(images), clf.features(real)
    g, r = per_prompt_spread(gen_f, items, colours), per_prompt_spread(real_f, items, colours)
    precision, recall = precision_recall(gen_f, real_f, k)
    return {
        "diversity_ratio": (g / r) if g is not None and r else None,
        "spread_generated": g, "spread_real": r, "precision": precision, "recall": recall, "k": k,
    }


