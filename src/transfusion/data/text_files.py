"""A user's text as the text-only documents of the mixture (`data.text_files`), instead of Shakespeare.

    data.text_files = ["notes.txt", "corpus.jsonl", "more/"]   # a folder: its *.txt, *.md and *.jsonl, sorted

- JSONL (name ends in .jsonl): one document per line, {"text": "..."}. A line that is not JSON (`bad_line`), not
  an object with a string "text" (`no_text`) or whose text is blank (`empty_text`) is skipped and counted.
- Any other file is plain text: one document, decoded as UTF-8 line by line; a line that is not UTF-8 is skipped
  and counted (`not_utf8`), so one bad byte costs a line, not the file. "\\r\\n" becomes "\\n".
- Held-out split (split="test": perplexity): the last `data.text_heldout` of each file, counted in lines (plain
  text) or documents (JSONL), rounded up; the rest is "train". Per file, so every source is in both splits and a
  corpus sorted by source still has a representative test split; by position, so the test text is a continuation
  the model never saw, as Shakespeare's held-out plays are. A file of one line (one document) is train only.
- A missing file, a folder without text files, or a split with no text at all is an error (TextFilesError, one
  `error:` line through the CLI), never a silent fallback to Shakespeare.

Tokenized corpora are cached on disk like Shakespeare's (text_corpus.cached_corpus), keyed by a hash of the
split's texts, so an edited file is re-tokenized and an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from transfusion.config import ConfigError, DataConfig
from transfusion.data.image_text import SkipStats
from transfusion.data.text_corpus import TokenCorpus, cached_corpus, shakespeare_corpus
from transfusion.log import log
from transfusion.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")  # what a folder in data.text_files contributes
READ_RULES_VERSION = 1  # bump when the reading rules change: it invalidates cached tokenizations
SPLITS = ("train", "test")


class TextFilesError(ConfigError):
    """data.text_files cannot be used: a missing file, nothing readable, or a bad data.text_heldout."""


@dataclass
class TextSplit:
    texts: list[str]  # one string per document
    stats: SkipStats  # skipped lines by reason; `used` = documents of the split


def expand(paths: list[str], what: str = "data.text_files") -> list[Path]:
    """The files `paths` names: files as given, folders as their text files (recursive, sorted); `what` names
    the setting (or argument) in errors."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise TextFilesError(f"{what}: folder {p} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise TextFilesError(f"{what}: {p} not found")
    if not files:
        raise TextFilesError(f"{what} is empty: name text or JSONL files")
    return files


def _jsonl_documents(path: Path, stats: SkipStats) -> list[str]:
    docs: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):  # json raises both for hostile lines (see data/folder.py)
                stats.skip("bad_line", where)
                continue
            text = entry.get("text") if isinstance(entry, dict) else None
            if not isinstance(text, str):
                stats.skip("no_text", where)
            elif not text.strip():
                stats.skip("empty_text", where)
            else:
                docs.append(text.replace("\r\n", "\n"))
    return docs


def _text_lines(path: Path, stats: SkipStats) -> list[str]:
    raw = path.read_bytes()
    try:  # the common case: the whole file is UTF-8
        return raw.decode("utf-8").replace("\r\n", "\n").splitlines(keepends=True)
    except UnicodeDecodeError:
        pass
    lines: list[str] = []
    for n, line in enumerate(raw.splitlines(keepends=True), 1):
        try:
            lines.append(line.decode("utf-8").replace("\r\n", "\n"))
        except UnicodeDecodeError:
            stats.skip("not_utf8", f"{path.name}:{n}")
    return lines


def summary(stats: SkipStats) -> str:
    """SkipStats.summary in words for text: documents, not examples."""
    return stats.summary().replace("data: ", "", 1).replace("examples used", "documents used", 1)


def heldout_count(n: int, heldout: float) -> int:
    """Units (lines or documents) of a file of `n` that go to the test split: ceil(n * heldout), leaving >= 1."""
    if n < 2 or heldout <= 0:
        return 0
    return min(n - 1, math.ceil(n * heldout))


def read_split(paths: list[str], heldout: float, split: str, what: str = "data.text_files") -> TextSplit:
    """The documents of `split` from the files `paths` names (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if not 0.0 <= heldout < 1.0:
        raise TextFilesError(f"held-out share {heldout}: expected a value in [0, 1) (data.text_heldout)")
    stats = SkipStats()
    texts: list[str] = []
    for path in expand(paths, what):
        if path.suffix.lower() == ".jsonl":
            docs = _jsonl_documents(path, stats)
            cut = len(docs) - heldout_count(len(docs), heldout)
            texts += docs[:cut] if split == "train" else docs[cut:]
        else:
            lines = _text_lines(path, stats)
            cut = len(lines) - heldout_count(len(lines), heldout)
            doc = "".join(lines[:cut] if split == "train" else lines[cut:])
            if doc.strip():
                texts.append(doc)
    stats.used = len(texts)
    if not texts:
        why = " (the test split needs data.text_heldout > 0 and files of >= 2 lines)" if split == "test" else ""
        raise TextFilesError(f"{what}: no {split} text{why}; {summary(stats)}")
    return TextSplit(texts, stats)


def text_files_corpus(tokenizer: Tokenizer, paths: list[str], heldout: float, split: str) -> TokenCorpus:
    """The tokenized documents of `split`; what was skipped is logged (a count by reason, a few locations)."""
    part = read_split(paths, heldout, split)
    if part.stats.total:
        log.warning(f"text files ({split}): {summary(part.stats)}")
    h = hashlib.sha256(f"text-files-v{READ_RULES_VERSION}".encode())
    for text in part.texts:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return cached_corpus(tokenizer, f"text_files/{h.hexdigest()}", lambda: part.texts)


def text_corpus(data: DataConfig, tokenizer: Tokenizer, split: str) -> TokenCorpus:
    """The text-only documents of a split: `data.text_files` when set, else Shakespeare. The one place that
    decides, so every loader (and the perplexity, which should ask here too) reads the same text."""
    if data.text_files:
        return text_files_corpus(tokenizer, list(data.text_files), data.text_heldout, split)
    return shakespeare_corpus(tokenizer, split)
