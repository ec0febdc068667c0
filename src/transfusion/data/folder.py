"""A user's own image-caption folder: `DIR/captions.jsonl` + image files (also `data.dataset = "folder"`).

    DIR/captions.jsonl   one JSON object per line: {"image": "cat.png", "caption": "a cat on a mat"}
                         "caption" (or "captions") may list several: ["a cat", "a cat on a mat"]; each time the
                         image is used one of them is drawn (as the built-in datasets' caption alternatives)
                         "split": "test" (or "val") / "train" puts the line in that split (optional)
    DIR/cat.png          any format Pillow reads; converted to RGB, centre-cropped and resized to model.image_size
                         (images.py: the project's one rule)

Validation split, one rule per line, first that applies: the line's own "split"; else, with data.val_fraction > 0,
a hash of its image name (the rule of `transfusion shard --val-fraction`, so a folder and its shards split
alike, stable under reordering and additions); else "train" when other lines are marked. A folder with no marks
and data.val_fraction = 0 has no held-out images: both splits are the whole folder (as before the split
existed), and loading the test split says so.

Bad entries are skipped, never silently eaten: each is counted by reason in `SkipStats`, whose `summary()` the
trainer prints at the end of a run. Captions over data.max_caption_tokens are dropped one by one; an entry whose
every caption is too long is skipped (`caption_too_long`). Lines of the other split are neither used nor
counted. A split with nothing usable is an error that names the reasons.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transfusion.config import ConfigError
from transfusion.data.dataset import Dataset
from transfusion.data.image_text import ImageTextSet, SkipStats
from transfusion.images import ImageReadError, read_uint8
from transfusion.log import log

CAPTIONS_FILE = "captions.jsonl"
SPLIT_NAMES = {"train": "train", "test": "test", "val": "test", "validation": "test"}  # a line's "split" -> ours


class FolderDatasetError(ValueError):
    """The folder cannot be used at all (no captions.jsonl, or no usable example)."""


@dataclass
class Entry:
    image: str
    captions: list[str]  # stripped, non-empty; [] when the line has none
    split: str | None  # "train" / "test" from the line's "split", None when it has none


def _parse_line(line: str) -> Entry | None:
    """A captions.jsonl line -> Entry, or None for a bad line (not JSON, no image, an unknown split)."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # found by fuzzing: json raises a plain ValueError for an int of over
        return None  # 4,300 digits and RecursionError for deep nesting, not only JSONDecodeError (a ValueError)
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        return None
    split = entry.get("split")
    if split is not None and SPLIT_NAMES.get(split if isinstance(split, str) else "") is None:
        return None
    caps = entry.get("caption", entry.get("captions"))
    caps = [caps] if isinstance(caps, str) else caps if isinstance(caps, list) else []
    return Entry(entry["image"], [c.strip() for c in caps if isinstance(c, str) and c.strip()],
                 SPLIT_NAMES[split] if split is not None else None)


def is_val(name: str, val_fraction: float) -> bool:
    """The hash split of `transfusion shard --val-fraction` (shards_writer.is_val, which imports this module, so
    the rule is repeated here; tests/test_data_folder.py checks that the two agree)."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _side(entry: Entry, val_fraction: float, marked: bool) -> str | None:
    """The split an entry belongs to (module docstring), None when the folder is not split at all."""
    if entry.split is not None:
        return entry.split
    if val_fraction > 0:
        return "test" if is_val(entry.image, val_fraction) else "train"
    return "train" if marked else None


def _entries(index: Path, stats: SkipStats) -> list[tuple[str, Entry]]:
    """(where, Entry) of every parsable non-blank line; bad lines counted."""
    out: list[tuple[str, Entry]] = []
    for n, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        entry = _parse_line(line)
        if entry is None:
            stats.skip("bad_line", f"{CAPTIONS_FILE}:{n}")
        else:
            out.append((f"{CAPTIONS_FILE}:{n}", entry))
    return out


def load_folder(root: str | Path, tokenizer, image_size: int, max_caption_tokens: int, split: str | None = None,
                val_fraction: float = 0.0) -> tuple[ImageTextSet, SkipStats]:
    """Read DIR/captions.jsonl and the images of `split` ("train" / "test"; None: every line)
    -> (ImageTextSet, SkipStats). Raises FolderDatasetError."""
    root = Path(root)
    index = root / CAPTIONS_FILE
    if not index.is_file():
        raise FolderDatasetError(f"{index} not found: a folder dataset needs {CAPTIONS_FILE} with lines like "
                                 '{"image": "cat.png", "caption": "a cat on a mat"}')
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction}: expected a share in [0, 1)")
    stats = SkipStats()
    entries = _entries(index, stats)
    marked = any(e.split is not None for _, e in entries)
    if split == "test" and not marked and val_fraction == 0:
        log.warning(f"folder {root} has no validation split (no \"split\" in {CAPTIONS_FILE}, data.val_fraction"
                    " = 0): its test split is the training images")
    pixels: list[np.ndarray] = []
    captions: list[list[np.ndarray]] = []
    for where, entry in entries:
        side = _side(entry, val_fraction, marked)
        if split is not None and side is not None and side != split:
            continue
        if not entry.captions:
            stats.skip("empty_caption", where)
            continue
        ids = [t for t in tokenizer.encode_batch(entry.captions) if len(t) <= max_caption_tokens]
        if not ids:
            stats.skip("caption_too_long", f"{where} (> {max_caption_tokens} tokens)")
            continue
        path = root / entry.image
        if not path.is_file():
            stats.skip("missing_file", f"{where} ({entry.image})")
            continue
        try:
            pixels.append(read_uint8(path, image_size, channels=3))
        except ImageReadError:
            stats.skip("unreadable_image", f"{where} ({entry.image})")
            continue
        captions.append([np.asarray(t, dtype=np.int64) for t in ids])
    stats.used = len(pixels)
    if not pixels:
        where = f"the {split} split of {root}" if split else str(root)
        hint = ' (mark lines "split": "test" or set data.val_fraction)' if split == "test" else ""
        raise FolderDatasetError(f"no usable image-caption pair in {where}{hint}; {stats.summary()}")
    images = ImageTextSet(
        pixels=torch.from_numpy(np.stack(pixels)),  # (N, 3, size, size)
        caption_of=np.arange(len(pixels), dtype=np.int64),
        caption_sets=captions,
        image_size=image_size,
        name=f"folder:{root}" + (f":{split}" if split else ""),
    )
    return images, stats


class FolderDataset(Dataset):
    """A user's folder (`data.folder`): DIR/captions.jsonl + images, split as the module docstring says."""

    name = "folder"

    def _root(self) -> Path:
        if not self.data.folder:
            raise ConfigError('data.dataset = "folder" needs data.folder = DIR (images + captions.jsonl)')
        return Path(self.data.folder)

    def image_set(self, tokenizer, split: str, image_size: int, channels: int) -> tuple[ImageTextSet, SkipStats]:
        self.require_rgb(channels)
        return load_folder(self._root(), tokenizer, image_size, self.data.max_caption_tokens, split,
                           self.data.val_fraction)

    def sample_prompts(self, n: int) -> list[str]:
        """The first caption of the first `n` lines with distinct captions in captions.jsonl."""
        index = self._root() / CAPTIONS_FILE
        if not index.is_file():
            return []
        seen: list[str] = []
        for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
            entry = _parse_line(line) if line.strip() else None
            if entry and entry.captions and entry.captions[0] not in seen:
                seen.append(entry.captions[0])
                if len(seen) == n:
                    break
        return seen

    def describe(self) -> str:
        return f"folder {self._root()}"
