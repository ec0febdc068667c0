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

What the dataset-driven evaluation (evaluate/report.py) asks; every method may return None / {} when the
dataset has no such thing, and the report then says which metric was skipped and why:

    ds.attributes()                                     # {"item": [...names], "colour": [...]}: exact attributes
    ds.eval_prompts(n, seed, heldout_share)             # EvalPrompts: what to draw, its labels, held-out flags
    ds.reference_images(prompts, seed, image_size)      # real TEST images matching those labels one for one (FID)
    ds.caption_references(labels)                       # every phrasing of each example's caption (CIDEr refs)
    ds.parse_caption(text)                              # {"item": 3, "colour": -1}: attributes a caption names
    ds.attribute_reader(image_size)                     # images -> {"item": (N,), ...}: read attributes off pixels

A new dataset subclasses `Dataset`, implements `image_set` and `sample_prompts` (the rest has defaults) and
registers its name in registry.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

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


@dataclass
class EvalPrompts:
    """Text -> image prompts of the evaluation suite with the attribute values each one asks for."""

    prompts: list[str]  # (N) the canonical caption to draw
    labels: dict[str, Tensor]  # attribute name -> (N,) long index into attributes()[name]; -1 = not asked
    heldout: Tensor  # (N,) bool: a combination never seen in training (compositional generalisation)


# images (N, C, H, W) in [-1, 1] -> attribute name -> (N,) long predicted value (the exact scorers)
AttributeReader = Callable[[Tensor], dict[str, Tensor]]


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

    # ---- evaluation hooks (evaluate/report.py); defaults: the dataset has none of these

    def attributes(self) -> dict[str, list[str]]:
        """Attribute name -> value names, for attributes with an exact scorer (e.g. item, colour)."""
        return {}

    def eval_prompts(self, n: int, seed: int, heldout_share: float) -> EvalPrompts | None:
        """`n` prompts to draw, about `heldout_share` of them held-out combinations when the dataset has any."""
        return None

    def reference_images(self, prompts: EvalPrompts, seed: int, image_size: int) -> Tensor | None:
        """Real test images (N, 3, S, S) in [-1, 1] with the labels of `prompts`, one per prompt (FID's real
        side: the generator is not penalised for the prompt mix)."""
        return None

    def caption_references(self, labels: dict[str, Tensor]) -> list[list[str]]:
        """Every phrasing of the caption of each example (labels as in Examples.labels): CIDEr's references."""
        return []

    def parse_caption(self, text: str) -> dict[str, int]:
        """The attribute values a generated caption names (-1 where it names none): caption accuracy."""
        return {}

    def attribute_reader(self, image_size: int) -> AttributeReader | None:
        """A function reading the attributes off images, or None when the dataset has no exact scorer."""
        return None
