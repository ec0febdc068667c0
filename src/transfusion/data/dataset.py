"""What a dataset is to the rest of the project: one interface, looked up by `data.dataset` (registry.py).

The trainer, the demo, the sample grids and the evaluation ask the dataset instead of knowing colour fashion:

    ds = get_dataset(cfg.data)
    images, stats = ds.image_set(tokenizer, "train", image_size, channels)  # training / test examples + captions
    ds.sample_prompts(8)                                # prompts of the trainer's periodic sample grid
    ds.prompt_grid()                                    # rows x columns of prompts for the demo grid, or None
    ds.examples("test", n, seed, image_size)            # real images with their captions (captioning demo)
    ds.eval_suite                                       # which scorers of evaluate/ apply, or None
    ds.describe()                                       # where the data comes from, for logs
    ds.document_sampler                                 # the class that draws its documents (mixture.py)

A new dataset subclasses `Dataset`, implements `image_set` and `sample_prompts` (the rest has defaults) and
registers its name in registry.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from transfusion.config import ConfigError, DataConfig
from transfusion.data.image_text import ImageTextSet, SkipStats
from transfusion.data.mixture import DocumentSampler


@dataclass
class PromptGrid:
    """Prompts laid out as a labelled grid (row-major), with some cells marked (e.g. held-out combinations)."""

    prompts: list[str]
    ncols: int
    row_labels: list[str]
    col_labels: list[str]
    marked: list[bool] = field(default_factory=list)


@dataclass
class Examples:
    """Real images (N, C, H, W) in [-1, 1] with their canonical captions, plus any labels the dataset has."""

    images: Tensor
    captions: list[str]
    labels: dict[str, Tensor] = field(default_factory=dict)


class Dataset(ABC):
    name: ClassVar[str]
    eval_suite: ClassVar[str | None] = None  # a suite of evaluate/ that scores this dataset's images, if any
    # draws the documents of a batch from `image_set`'s examples: image-caption ones, or edits (data/edits.py)
    document_sampler: ClassVar[type[DocumentSampler]] = DocumentSampler

    def __init__(self, data: DataConfig) -> None:
        self.data = data

    @abstractmethod
    def image_set(self, tokenizer: Any, split: str, image_size: int, channels: int
                  ) -> tuple[ImageTextSet, SkipStats]:
        """The images of `split` ("train" / "test") at `image_size`, captions tokenized; skipped inputs counted."""

    @abstractmethod
    def sample_prompts(self, n: int) -> list[str]:
        """`n` prompts that show what a model of this dataset can draw (the trainer's sample grid)."""

    def require_rgb(self, channels: int) -> None:
        """ConfigError unless the model takes 3-channel images (every dataset here gives RGB)."""
        if channels != 3:
            raise ConfigError(f"the {self.name} dataset gives RGB images; set model.image_channels = 3 (got {channels})")

    def prompt_grid(self) -> PromptGrid | None:
        return None

    def examples(self, split: str, n: int, seed: int, image_size: int) -> Examples | None:
        return None

    def describe(self) -> str:
        return self.name
