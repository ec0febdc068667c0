"""A user's own image-caption folder: `DIR/captions.jsonl` + image files (also `data.dataset = "folder"`).

    DIR/captions.jsonl   one JSON object per line: {"image": "cat.png", "caption": "a cat on a mat"}
    DIR/cat.png          any format Pillow reads; converted to RGB, centre-cropped and resized to model.image_size
                         (images.py: the project's one rule)

Bad entries are skipped, never silently eaten: each is counted by reason in `SkipStats`, whose `summary()` the
trainer prints at the end of a run. A folder with nothing usable is an error that names the reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from transfusion.config import ConfigError
from transfusion.data.dataset import Dataset
from transfusion.data.image_text import ImageTextSet, SkipStats
from transfusion.images import ImageReadError, read_uint8

CAPTIONS_FILE = "captions.jsonl"


class FolderDatasetError(ValueError):
    """The folder cannot be used at all (no captions.jsonl, or no usable example)."""


def _parse_line(line: str) -> tuple[str, str] | None:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # found by fuzzing: json raises a plain ValueError for an int of over
        return None  # 4,300 digits and RecursionError for deep nesting, not only JSONDecodeError (a ValueError)
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        return None
    cap = entry.get("caption")
    return entry["image"], cap.strip() if isinstance(cap, str) else ""


def load_folder(root: str | Path, tokenizer, image_size: int,
                max_caption_tokens: int) -> tuple[ImageTextSet, SkipStats]:
    """Read DIR/captions.jsonl and its images -> (ImageTextSet, SkipStats). Raises FolderDatasetError."""
    root = Path(root)
    index = root / CAPTIONS_FILE
    if not index.is_file():
        raise FolderDatasetError(f"{index} not found: a folder dataset needs {CAPTIONS_FILE} with lines like "
                                 '{"image": "cat.png", "caption": "a cat on a mat"}')
    stats = SkipStats()
    pixels: list[np.ndarray] = []
    captions: list[list[np.ndarray]] = []
    for n, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{CAPTIONS_FILE}:{n}"
        parsed = _parse_line(line)
        if parsed is None:
            stats.skip("bad_line", where)
            continue
        name, cap = parsed
        if not cap:
            stats.skip("empty_caption", where)
            continue
        ids = tokenizer.encode(cap)
        if len(ids) > max_caption_tokens:
            stats.skip("caption_too_long", f"{where} ({len(ids)} > {max_caption_tokens} tokens)")
            continue
        path = root / name
        if not path.is_file():
            stats.skip("missing_file", f"{where} ({name})")
            continue
        try:
            pixels.append(read_uint8(path, image_size, channels=3))
        except ImageReadError:
            stats.skip("unreadable_image", f"{where} ({name})")
            continue
        captions.append([np.asarray(ids, dtype=np.int64)])
    stats.used = len(pixels)
    if not pixels:
        raise FolderDatasetError(f"no usable image-caption pair in {root}; {stats.summary()}")
    images = ImageTextSet(
        pixels=torch.from_numpy(np.stack(pixels)),  # (N, 3, size, size)
        caption_of=np.arange(len(pixels), dtype=np.int64),
        caption_sets=captions,
        image_size=image_size,
        name=f"folder:{root}",
    )
    return images, stats


class FolderDataset(Dataset):
    """A user's folder (`data.folder`): DIR/captions.jsonl + images; the same examples serve both splits."""

    name = "folder"

    def _root(self) -> Path:
        if not self.data.folder:
            raise ConfigError('data.dataset = "folder" needs data.folder = DIR (images + captions.jsonl)')
        return Path(self.data.folder)

    def image_set(self, tokenizer, split: str, image_size: int, channels: int) -> tuple[ImageTextSet, SkipStats]:
        self.require_rgb(channels)
        return load_folder(self._root(), tokenizer, image_size, self.data.max_caption_tokens)

    def sample_prompts(self, n: int) -> list[str]:
        """The first `n` distinct non-empty captions of captions.jsonl."""
        index = self._root() / CAPTIONS_FILE
        if not index.is_file():
            return []
        seen: list[str] = []
        for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
            parsed = _parse_line(line) if line.strip() else None
            if parsed and parsed[1] and parsed[1] not in seen:
                seen.append(parsed[1])
                if len(seen) == n:
                    break
        return seen

    def describe(self) -> str:
        return f"folder {self._root()}"
