"""The project's own Fashion-MNIST item classifier: the "item" half of the alignment scorer and the feature
extractor of the fast Fréchet distance (`fd_classifier`).

No CLIP or pretrained Fashion-MNIST net ships offline, so the project trains one: a small CNN, deterministic
(fixed seed, deterministic algorithms), trained on the real Fashion-MNIST train split in well under two minutes
on 2 CPU threads, then cached as safetensors under the cache directory keyed by a hash of its hyperparameters.

Colour must not matter: the network sees the per-pixel *maximum over RGB channels*. A tinted item is
`gray * colour` and every colour in `fashion.COLOURS` has its largest channel in [0.85, 1], so the max-channel
view of any tinted image is the grayscale item times a factor close to 1; training randomly scales intensity
over [0.75, 1] so that factor (and any tint, white included) is irrelevant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfusion.data import fashion
from transfusion.env import cache_dir
from transfusion.log import log

_VERSION = 1  # bump when the architecture or preprocessing changes, so old caches are not reused


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    n_train: int = 60_000  # how many train images to use (tests may use fewer)
    min_scale: float = 0.75  # intensity augmentation: x * U(min_scale, 1), covers every tint's max channel
    noise_std: float = 0.03  # pixel noise augmentation: generated images are never perfectly clean
    hflip: bool = True
    seed: int = 0
    width: int = 16
    feature_dim: int = 128

    def key(self) -> str:
        blob = json.dumps({"v": _VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ItemCNN(nn.Module):
    """(N, 1, 28, 28) in [-1, 1] -> logits (N, 10); `.features` gives the penultimate (N, feature_dim)."""

    def __init__(self, width: int = 16, feature_dim: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, len(fashion.ITEMS))
        self.drop = nn.Dropout(0.3)

    def features(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (N, w, 14, 14)
        x = F.relu(self.bn2(self.conv2(x)))  # (N, 2w, 14, 14)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # (N, 2w, 7, 7)
        return F.relu(self.fc(x.flatten(1)))  # (N, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))


def to_classifier_input(images: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1] (C = 1 or 3, any H, W) -> (N, 1, 28, 28) in [-1, 1], max over channels."""
    x = images.float().amax(dim=1, keepdim=True)  # (N, 1, H, W): tint-invariant view
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0)


@dataclass
class ItemClassifier:
    """A trained ItemCNN plus what it was trained with and how well it does on the real test split."""

    net: ItemCNN
    config: ClassifierConfig
    test_accuracy: float
    train_seconds: float = 0.0

    @torch.no_grad()
    def logits(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, 10)."""
        self.net.eval()
        if not len(images):
            return torch.zeros(0, len(fashion.ITEMS))
        return torch.cat([self.net(to_classifier_input(b)) for b in images.split(batch_size)])

    def predict(self, images: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> item ids (N,)."""
        return self.logits(images).argmax(-1)

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 1000) -> np.ndarray:
        """(N, C, H, W) in [-1, 1] -> penultimate features (N, feature_dim) float64, for Fréchet distance."""
        self.net.eval()
        if not len(images):
            return np.zeros((0, self.config.feature_dim))
        out = [self.net.features(to_classifier_input(b)) for b in images.split(batch_size)]
        return torch.cat(out).double().numpy()


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[torch.Generator]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield torch.Generator().manual_seed(seed)
    finally:
        torch.use_deterministic_algorithms(previous)


def _augment(gray: Tensor, cfg: ClassifierConfig, gen: Tensor | torch.Generator) -> Tensor:
    """gray (B, 1, 28, 28) in [0, 1] -> (B, 1, 28, 28) in [-1, 1] with random intensity, noise and flips."""
    b = gray.shape[0]
    scale = torch.empty(b, 1, 1, 1).uniform_(cfg.min_scale, 1.0, generator=gen)
    x = gray * scale + cfg.noise_std * torch.randn(gray.shape, generator=gen)
    if cfg.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.clamp(0.0, 1.0).mul(2.0).sub(1.0)


def evaluate_accuracy(net: ItemCNN, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on uint8 (N, 28, 28) grayscale images (the max-channel view of any tint)."""
    clf = ItemClassifier(net, ClassifierConfig(), 0.0)
    x = torch.from_numpy(np.array(images)).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, 28, 28)
    pred = clf.predict(x).numpy()
    return float((pred == labels).mean())


@contextlib.contextmanager
def flushed_denormals():
    """Flush denormal floats to zero inside the block (they make CPU training of the small scorers several times
    slower), then turn it off again: the flag is process-wide CPU state (FTZ/DAZ), and left on it breaks code that
    needs IEEE subnormals afterwards (hypothesis refuses to generate floats; found by the fuzz tests)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@flushed_denormals()  # denormals slow CPU training several times; off again afterwards (process-wide state)
def train_classifier(cfg: ClassifierConfig = ClassifierConfig(), progress: bool = False) -> ItemClassifier:
    """Train deterministically on the real Fashion-MNIST train split; report real test accuracy."""
    start = time.time()
    images, labels = fashion.load_fashion_mnist("train")
    test_images, test_labels = fashion.load_fashion_mnist("test")
    with _deterministic(cfg.seed) as gen:
        order = torch.randperm(len(images), generator=gen)[: cfg.n_train]
        x_all = torch.from_numpy(images.copy()).float().div(255.0).unsqueeze(1)[order]  # (n, 1, 28, 28)
        y_all = torch.from_numpy(labels)[order]
        net = ItemCNN(cfg.width, cfg.feature_dim)
        steps = cfg.epochs * ((len(x_all) + cfg.batch_size - 1) // cfg.batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
        net.train()
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(x_all), generator=gen)
            for idx in perm.split(cfg.batch_size):
                loss = F.cross_entropy(net(_augment(x_all[idx], cfg, gen)), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if progress:
                log.info(f"classifier epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.3f}")
    acc = evaluate_accuracy(net, test_images, test_labels)
    return ItemClassifier(net.eval(), cfg, acc, time.time() - start)


def _cache_path(cfg: ClassifierConfig, root: Path | None) -> Path:
    return (root or cache_dir()) / f"item-classifier-{cfg.key()}.safetensors"


def save_classifier(clf: ItemClassifier, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": json.dumps(dataclasses.asdict(clf.config)),
        "test_accuracy": repr(clf.test_accuracy),
        "train_seconds": repr(clf.train_seconds),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in clf.net.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def load_classifier_file(path: Path) -> ItemClassifier:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    cfg = ClassifierConfig(**json.loads(meta["config"]))
    net = ItemCNN(cfg.width, cfg.feature_dim)
    net.load_state_dict(load_file(str(path)))
    return ItemClassifier(net.eval(), cfg, float(meta["test_accuracy"]), float(meta.get("train_seconds", 0)))


def get_classifier(
    cfg: ClassifierConfig = ClassifierConfig(), root: Path | None = None, progress: bool = True
) -> ItemClassifier:
    """The cached classifier for `cfg`, training (and caching) it on first use."""
    path = _cache_path(cfg, root)
    if path.is_file():
        try:
            return load_classifier_file(path)
        except Exception as e:  # a corrupt cache file is retrained, never trusted
            log.warning(f"ignoring unreadable classifier cache {path}: {e}")
    if progress:
        log.info(f"training the item classifier (cached at {path}) ...")
    clf = train_classifier(cfg, progress=progress)
    if progress:
        log.info(f"item classifier: test accuracy {clf.test_accuracy:.4f} in {clf.train_seconds:.0f}s")
    save_classifier(clf, path)
    return clf
