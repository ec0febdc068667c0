"""The colour fashion dataset (`data.dataset = "colour_fashion"`): which colour each Fashion-MNIST image gets,
where the images come from, and its prompts, grid and examples for the rest of the project (dataset.py).

Every image gets one fixed colour, a hash of (split, index in the original split), so the same image has the
same colour in the full dataset and in the committed subset, on every machine and every rank. Training images
only get colours that keep their (item, colour) out of `fashion.HELDOUT`, so the held-out combinations are
never seen in training; test images use all 8 colours, i.e. all 80 combinations.

Interleaved documents (data.interleaved_prob) put two images in one document with `INTERLEAVED_TEMPLATES` over
the canonical captions, e.g. "two items: a red sneaker <image> and a blue bag <image>".

Images come from the Debian package (`use_full_dataset = true` and installed) or from the committed subset
`assets/fashion_subset.npz` (scripts/make_subset.py: 300 train + 100 test images per item).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from transfusion.data import fashion
from transfusion.data.dataset import AttributeReader, Dataset, EvalPrompts, Examples, PromptGrid
from transfusion.data.image_text import ImageTextSet, InterleavedText, SkipStats, numpy_patchify
from transfusion.images import resize
from transfusion.log import log

SUBSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "fashion_subset.npz"
_SPLIT_SALT = {"train": 0x5EED_0001, "test": 0x5EED_0002}
# (text before image a, text between images a and b) of an interleaved document; {a}/{b}: canonical captions.
# Most open with words a single caption never starts with, so after the first image the model can tell from
# the prefix whether the document goes on (greedy decoding then writes the second part instead of EOS).
INTERLEAVED_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("two items: {a}", "and {b}"),
    ("first {a}", "then {b}"),
    ("{a}", "and next to it {b}"),
)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread, platform-independent hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def allowed_colours(split: str) -> list[np.ndarray]:
    """Per item, the colour ids an image of that split may get (train excludes HELDOUT)."""
    n_col = len(fashion.COLOUR_NAMES)
    if split == "test":
        return [np.arange(n_col) for _ in fashion.ITEMS]
    return [np.array([c for c in range(n_col) if (i, c) not in fashion.HELDOUT]) for i in range(len(fashion.ITEMS))]


def assign_colours(index: np.ndarray, labels: np.ndarray, split: str) -> np.ndarray:
    """(N,) original indices + (N,) item ids -> (N,) colour ids, deterministic per (split, index)."""
    if split not in _SPLIT_SALT:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    h = _mix64(np.asarray(index, dtype=np.uint64) + np.uint64(_SPLIT_SALT[split]) * np.uint64(1 << 32))
    out = np.empty(len(index), dtype=np.int64)
    for item, allowed in enumerate(allowed_colours(split)):
        sel = np.asarray(labels) == item
        out[sel] = allowed[(h[sel] % np.uint64(len(allowed))).astype(np.int64)]
    return out


_warned: set[str] = set()


def _warn_fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning(f"{reason}; using the committed Fashion-MNIST subset {SUBSET_PATH.name} "
                    "(300 train + 100 test images per item). For the full 70k images run "
                    "`sudo apt-get install dataset-fashion-mnist` (or `make data`).")


@functools.lru_cache(maxsize=4)
def load_split(split: str, use_full_dataset: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,), original indices int64 (N,)) of a split."""
    if use_full_dataset:
        if fashion.fashion_dir() is not None:
            images, labels = fashion.load_fashion_mnist(split)
            return images, labels, np.arange(len(labels), dtype=np.int64)
        _warn_fallback("the full Fashion-MNIST dataset is not installed")
    if not SUBSET_PATH.is_file():
        raise fashion.DatasetMissing(
            f"the committed subset {SUBSET_PATH} is missing (restore it with git, or rebuild it with "
            "`scripts/make_subset.py` after `sudo apt-get install dataset-fashion-mnist`)"
        )
    with np.load(SUBSET_PATH, allow_pickle=False) as z:
        return (z[f"{split}_images"], z[f"{split}_labels"].astype(np.int64), z[f"{split}_index"].astype(np.int64))


class TintedImageSet(ImageTextSet):
    """Gray items (N, 1, 28, 28) uint8 with a colour id each, tinted on render exactly as `fashion.tint`."""

    def __init__(self, colours: Tensor, **kw) -> None:
        super().__init__(**kw)
        if self.pixels.shape[1] != 1:
            raise ValueError("tinted sets store gray pixels (N, 1, H, W)")
        self.colours = colours  # (N,) long
        self._rgb = fashion.colour_table().numpy()  # (8, 3) float32
        self._gray: np.ndarray | None = None  # (N, S, S) float32 in [0, 1], resized once when S != 28
        if self.pixels.shape[-1] != self.image_size:
            self._gray = np.concatenate([resize(self.pixels[i:i + 4096].float().div(255.0), self.image_size)[:, 0]
                                         .numpy() for i in range(0, len(self.pixels), 4096)])

    @property
    def channels(self) -> int:
        return 3

    def render(self, idx: Tensor | np.ndarray) -> Tensor:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return fashion.tint(self.pixels[idx][:, 0].numpy(), self.colours[idx].numpy(), self.image_size)

    def patches(self, idx: np.ndarray, patch_size: int) -> Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        if self._gray is not None:
            g = self._gray[idx]
        else:
            g = self.pixels.numpy()[idx, 0].astype(np.float32) / np.float32(255.0)  # (n, S, S)
        rgb = self._rgb[self.colours.numpy()[idx]]  # (n, 3)
        x = g[:, None] * rgb[:, :, None, None]  # (n, 3, S, S), as fashion.tint
        return numpy_patchify(np.clip(x * np.float32(2.0) - np.float32(1.0), -1.0, 1.0), patch_size)


def interleaved_text(tokenizer) -> InterleavedText:
    """INTERLEAVED_TEMPLATES over the canonical caption of every (item, colour), indexed like caption_sets."""
    combos = [(i, c) for i in range(len(fashion.ITEMS)) for c in range(len(fashion.COLOUR_NAMES))]
    caps = [fashion.caption(i, c) for i, c in combos]
    first = [[t[0].format(a=cap) for cap in caps] for t in INTERLEAVED_TEMPLATES]
    then = [[t[1].format(b=cap) for cap in caps] for t in INTERLEAVED_TEMPLATES]
    flat = tokenizer.encode_batch([s for group in first + then for s in group])
    ids = [np.asarray(x, dtype=np.int64) for x in flat]
    k, n = len(INTERLEAVED_TEMPLATES), len(caps)
    rows = [ids[j * n:(j + 1) * n] for j in range(2 * k)]
    return InterleavedText(first=rows[:k], then=rows[k:])


def colour_fashion_set(tokenizer, split: str, image_size: int, use_full_dataset: bool) -> TintedImageSet:
    """The colour fashion ImageTextSet of a split; captions of every template, tokenized once."""
    images, labels, index = load_split(split, use_full_dataset)
    colours = assign_colours(index, labels, split)
    n_col = len(fashion.COLOUR_NAMES)
    texts = [fashion.all_captions(i, c) for i in range(len(fashion.ITEMS)) for c in range(n_col)]
    flat = tokenizer.encode_batch([t for alts in texts for t in alts])
    k = len(fashion.TEMPLATES)
    caption_sets = [[np.asarray(ids, dtype=np.int64) for ids in flat[j * k:(j + 1) * k]] for j in range(len(texts))]
    return TintedImageSet(
        pixels=torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1),  # (N, 1, 28, 28)
        caption_of=labels * n_col + colours,
        caption_sets=caption_sets,
        image_size=image_size,
        colours=torch.from_numpy(colours),
        labels=labels,
        name=f"colour_fashion/{split}",
        interleaved=interleaved_text(tokenizer),
    )


@dataclass
class FashionExamples:
    images: Tensor  # (N, 3, size, size) float in [-1, 1]
    items: Tensor  # (N,) long
    colours: Tensor  # (N,) long
    captions: list[str]  # canonical caption (template 0), e.g. "a red sneaker"


def fashion_examples(split: str = "test", n: int = 160, seed: int = 0, size: int = 28,
                     use_full_dataset: bool = True, combos: set[tuple[int, int]] | None = None) -> FashionExamples:
    """`n` real tinted images of a split for evaluation (captioning, FID, classifier), chosen by `seed`.

    `combos` restricts to those (item, colour) pairs, e.g. `fashion.HELDOUT` on the test split.
    """
    images, labels, index = load_split(split, use_full_dataset)
    colours = assign_colours(index, labels, split)
    pool = np.arange(len(labels))
    if combos is not None:
        pool = pool[np.array([(int(i), int(c)) in combos for i, c in zip(labels, colours)], dtype=bool)]
    if len(pool) == 0:
        raise ValueError(f"no {split} images of the requested combinations")
    pick = np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False)
    return FashionExamples(
        images=fashion.tint(images[pick], colours[pick], size),
        items=torch.from_numpy(labels[pick]),
        colours=torch.from_numpy(colours[pick]),
        captions=[fashion.caption(int(i), int(c)) for i, c in zip(labels[pick], colours[pick])],
    )


class ColourFashion(Dataset):
    """Fashion-MNIST items tinted in 8 colours; 8 (item, colour) combinations held out of training."""

    name = "colour_fashion"
    eval_suite = "colour_fashion"  # item classifier + colour reader + FID (evaluate/)

    def image_set(self, tokenizer, split: str, image_size: int, channels: int) -> tuple[ImageTextSet, SkipStats]:
        self.require_rgb(channels)
        images = colour_fashion_set(tokenizer, split, image_size, self.data.use_full_dataset)
        return images, SkipStats(used=len(images))

    def sample_prompts(self, n: int) -> list[str]:
        """Item i in colour 3i mod 8: consecutive prompts cover the items and the colours."""
        return [fashion.caption(i % len(fashion.ITEMS), (i * 3) % len(fashion.COLOUR_NAMES)) for i in range(n)]

    def prompt_grid(self) -> PromptGrid:
        """Every item (rows) in every colour (columns); held-out combinations marked."""
        combos = [(i, c) for i in range(len(fashion.ITEMS)) for c in range(len(fashion.COLOUR_NAMES))]
        return PromptGrid(
            prompts=[fashion.caption(i, c) for i, c in combos], ncols=len(fashion.COLOUR_NAMES),
            row_labels=list(fashion.ITEMS), col_labels=list(fashion.COLOUR_NAMES),
            marked=[combo in fashion.HELDOUT for combo in combos],
        )

    def examples(self, split: str, n: int, seed: int, image_size: int) -> Examples:
        ex = fashion_examples(split, n=n, seed=seed, size=image_size, use_full_dataset=self.data.use_full_dataset)
        return Examples(ex.images, ex.captions, {"item": ex.items, "colour": ex.colours})

    # ---- evaluation hooks: the exact scorers of evaluate/ (imported on use: data never needs evaluate)

    def attributes(self) -> dict[str, list[str]]:
        return {"item": list(fashion.ITEMS), "colour": list(fashion.COLOUR_NAMES)}

    def eval_prompts(self, n: int, seed: int, heldout_share: float) -> EvalPrompts:
        """Combinations cycled over all 80, shuffled; `heldout_share` of them from fashion.HELDOUT."""
        from transfusion.evaluate.alignment import is_heldout
        from transfusion.evaluate.reference import eval_prompts

        items, colours = eval_prompts(n, seed=seed, heldout_share=heldout_share)
        return EvalPrompts(prompts=[fashion.caption(int(i), int(c)) for i, c in zip(items, colours)],
                           labels={"item": items, "colour": colours}, heldout=is_heldout(items, colours))

    def reference_images(self, prompts: EvalPrompts, seed: int, image_size: int) -> Tensor:
        """Real test items of each prompt's class tinted in its colour (evaluate/reference.real_images)."""
        from transfusion.evaluate.reference import real_images

        images, labels, _ = load_split("test", self.data.use_full_dataset)
        return real_images(prompts.labels["item"], prompts.labels["colour"], seed=seed, size=image_size,
                           source=(images, labels))

    def caption_references(self, labels: dict[str, Tensor]) -> list[list[str]]:
        return [fashion.all_captions(int(i), int(c)) for i, c in zip(labels["item"], labels["colour"])]

    def parse_caption(self, text: str) -> dict[str, int]:
        from transfusion.evaluate.cider import parse_caption

        item, colour = parse_caption(text)
        return {"item": item, "colour": colour}

    def attribute_reader(self, image_size: int, classifier=None) -> AttributeReader:
        """Item by the project's classifier (`classifier`, else the cached default one), colour by the exact
        hue rule (evaluate/fashion_reader.py); any image size (both resize to what they need)."""
        from transfusion.evaluate.fashion_reader import FashionReader
        from transfusion.evaluate.classifier import get_classifier

        return FashionReader(classifier if classifier is not None else get_classifier())

    def describe(self) -> str:
        if self.data.use_full_dataset and fashion.fashion_dir() is not None:
            return f"colour fashion: full Fashion-MNIST from {fashion.fashion_dir()}"
        return ("colour fashion: committed subset (src/transfusion/assets/fashion_subset.npz); "
                "`make data` installs the full set")
