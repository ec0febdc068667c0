"""Colour fashion's attribute reader: what ColourFashion.attribute_reader gives the dataset-driven suite."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from transfusion.evaluate.alignment import read_colours
from transfusion.evaluate.fid import classifier_features


class FashionReader:
    """Colour fashion's attribute reader (Dataset.attribute_reader): images (N, 3, H, W) in [-1, 1] ->
    {"item": (N,), "colour": (N,)} from the item classifier and the exact colour rule (alignment.py).

    It also gives the classifier's feature spaces: `fd_features` (item features + colour shares, fd_classifier)
    and `features` (item features, diversity), and its calibration for the report."""

    def __init__(self, classifier) -> None:
        self.classifier = classifier

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        if not len(images):
            return {"item": torch.zeros(0, dtype=torch.long), "colour": torch.zeros(0, dtype=torch.long)}
        return {"item": self.classifier.predict(images), "colour": read_colours(images)[0]}

    def features(self, images: Tensor) -> np.ndarray:
        return self.classifier.features(images)

    def fd_features(self, images: Tensor) -> np.ndarray:
        return classifier_features(images, self.classifier)

    def calibration(self) -> dict[str, float]:
        return {"classifier_test_accuracy": self.classifier.test_accuracy}
