"""Score a folder of images from *any* generator, identically to our own samples.

Layout: DIR/prompts.jsonl, one JSON object per line, e.g.
    {"image": "x.png", "prompt": "a red sneaker", "item": 7, "colour": 0}
`item` / `colour` are optional: when absent they are parsed from the prompt (evaluate/cider.parse_caption).
Images of any size/mode are read by the project's one rule (images.read_image: RGB, centre crop, antialiased
bicubic) at 28 x 28.

Bad input never crashes a run: an unreadable line, a missing or corrupt image, or a prompt naming no known
item/colour is skipped and counted under `skipped` in the result.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from transfusion.data import fashion
from transfusion.evaluate.cider import parse_caption
from transfusion.images import ImageReadError, read_image

PROMPTS_FILE = "prompts.jsonl"


@dataclass
class FolderSamples:
    images: Tensor  # (N, 3, size, size) in [-1, 1]
    items: Tensor  # (N,)
    colours: Tensor  # (N,)
    prompts: list[str]
    files: list[str]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    n_lines: int = 0


def _label(entry: dict[str, Any], key: str, parsed: int, n: int) -> int:
    value = entry.get(key, parsed)
    if isinstance(value, str):  # a name instead of an id
        names = fashion.ITEMS if key == "item" else fashion.COLOUR_NAMES
        value = names.index(value) if value in names else -1
    value = int(value) if isinstance(value, (int, np.integer)) else -1
    return value if 0 <= value < n else -1


def _parse_line(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """(entry, None) or (None, skip reason)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None, "bad_json"
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        return None, "no_image_field"
    return entry, None


def load_images_folder(folder: str | Path, size: int = 28, prompts_file: str = PROMPTS_FILE) -> FolderSamples:
    """Read DIR/prompts.jsonl and its images, skipping (and counting) everything unusable."""
    folder = Path(folder)
    listing = folder / prompts_file
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: a folder to score needs {prompts_file} (see module doc)")
    images, items, colours, prompts, files = [], [], [], [], []
    skipped: Counter = Counter()
    n_lines = 0
    for line in listing.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        n_lines += 1
        entry, reason = _parse_line(line)
        if entry is None:
            skipped[reason] += 1
            continue
        prompt = str(entry.get("prompt", ""))
        p_item, p_colour = parse_caption(prompt)
        item = _label(entry, "item", p_item, len(fashion.ITEMS))
        colour = _label(entry, "colour", p_colour, len(fashion.COLOUR_NAMES))
        if item < 0 or colour < 0:
            skipped["unparsed_prompt"] += 1
            continue
        path = folder / entry["image"]
        if not path.is_file():
            skipped["missing_image"] += 1
            continue
        try:
            images.append(read_image(path, size, channels=3))
        except ImageReadError:
            skipped["corrupt_image"] += 1
            continue
        items.append(item)
        colours.append(colour)
        prompts.append(prompt)
        files.append(entry["image"])
    stacked = torch.stack(images) if images else torch.zeros(0, 3, size, size)
    return FolderSamples(
        stacked, torch.tensor(items, dtype=torch.long), torch.tensor(colours, dtype=torch.long),
        prompts, files, skipped, n_lines,
    )


def score_images_folder(
    folder: str | Path, classifier=None, with_fid: bool = True, seed: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Alignment + fd_classifier (+ Inception FID) of a folder's images vs real test images of the same prompts."""
    from transfusion.evaluate import alignment, fid
    from transfusion.evaluate.classifier import get_classifier
    from transfusion.evaluate.reference import real_images

    samples = load_images_folder(folder)
    n = len(samples.images)
    report: dict[str, Any] = {
        "folder": str(folder),
        "n_samples": n,
        "n_lines": samples.n_lines,
        "skipped": dict(samples.skipped),
        "n_skipped": sum(samples.skipped.values()),
    }
    if n == 0:
        report.update(alignment=None, fd_classifier=None, fid=None)
        return report
    classifier = classifier or get_classifier(progress=progress)
    report["alignment"] = alignment.score_alignment(samples.images, samples.items, samples.colours, classifier).summary()
    real = real_images(samples.items, samples.colours, seed=seed)
    report["fd_classifier"] = fid.fd_classifier(samples.images, real, classifier) if n >= 2 else None
    report["fid"] = fid.fid(samples.images, real, progress=progress) if (with_fid and n >= 2) else None
    report["classifier_test_accuracy"] = classifier.test_accuracy
    return report
