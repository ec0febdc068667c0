"""A user's own image-caption folder: `DIR/captions.jsonl` + image files (also `data.dataset = "folder"`).

    DIR/captions.jsonl   one JSON object per line: {"image": "cat.png", "caption": "a cat on a mat"}
    DIR/cat.png          any format Pillow reads; converted to RGB, resized to model.image_size (square)

Bad entries are skipped, never silently eaten: each is counted by reason in `SkipStats`, whose `summary()` the
trainer prints at the end of a run. A folder with nothing usable is an error that names the reasons.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from transfusion.data.image_text import ImageTextSet
from transfusion.tokenizer import Tokenizer

CAPTIONS_FILE = "captions.jsonl"


class FolderDatasetError(ValueError):
    """The folder cannot be used at all (no captions.jsonl, or no usable example)."""


@dataclass
class SkipStats:
    """Skipped inputs by reason (`bad_line`, `missing_file`, `unreadable_image`, `empty_caption`,
    `caption_too_long`), with a few example locations per reason for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    used: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return f"data: {self.used} examples used, none skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in sorted(self.counts.items())]
        return f"data: {self.used} examples used, {self.total} skipped: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {"used": self.used, "skipped": dict(self.counts)}


def _load_image(path: Path, size: int) -> np.ndarray | None:
    """(3, size, size) uint8, or None when Pillow cannot decode the file (corrupt, truncated, not an image)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _parse_line(line: str) -> tuple[str, str] | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        return None
    cap = entry.get("caption")
    return entry["image"], cap.strip() if isinstance(cap, str) else ""


def load_folder(root: str | Path, tokenizer: Tokenizer, image_size: int,
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
        img = _load_image(path, image_size)
        if img is None:
            stats.skip("unreadable_image", f"{where} ({name})")
            continue
        pixels.append(img)
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
