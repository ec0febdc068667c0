"""A tokenized text corpus from which text-only documents are cut (Shakespeare by default).

Passages start at a line start and, when possible, end at a line end, so EOS is learnt where a passage ends
and generation prompts look like the training text. Tokenizing the 4.6 MB training plays takes ~8 s on two
cores, so the token ids are cached on disk (keyed by a hash of the tokenizer and the text) and in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.data import shakespeare
from transfusion.env import cache_dir
from transfusion.tokenizer import Tokenizer


@dataclass
class TokenCorpus:
    ids: np.ndarray  # (n,) int64 token ids of all texts, concatenated
    text_starts: np.ndarray  # (n_texts + 1,) offset of each text in `ids`, then len(ids)
    line_starts: np.ndarray  # sorted offsets where a line starts (text starts included)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def sample(self, rng: np.random.Generator, max_tokens: int) -> tuple[np.ndarray, bool]:
        """A passage of at most `max_tokens` tokens -> (ids, complete: it ends at a line end)."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        pos = int(rng.integers(len(self.ids)))
        j = int(np.searchsorted(self.line_starts, pos))
        start = int(self.line_starts[min(j, len(self.line_starts) - 1)])  # past the last line start: use it
        text_end = int(self.text_starts[np.searchsorted(self.text_starts, start, side="right")])
        end = min(start + max_tokens, text_end)
        k = int(np.searchsorted(self.line_starts, end, side="right")) - 1
        if end == text_end:
            return self.ids[start:end], True
        if k >= 0 and int(self.line_starts[k]) > start + max_tokens // 2:  # cut at a line end, keeping >= half
            return self.ids[start:int(self.line_starts[k])], True
        return self.ids[start:end], False


def build_corpus(tokenizer: Tokenizer, texts: list[str]) -> TokenCorpus:
    """Tokenize `texts` (one string per document) into a TokenCorpus (no caching)."""
    parts = tokenizer.encode_batch(texts)
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    return _corpus(tokenizer, ids, np.array([len(p) for p in parts], dtype=np.int64))


def cached_corpus(tokenizer: Tokenizer, source_key: str, load_texts: Callable[[], list[str]]) -> TokenCorpus:
    """`build_corpus(tokenizer, load_texts())`, cached on disk under a hash of the tokenizer and `source_key`
    (which must change whenever the texts would), so a cache hit neither reads nor tokenizes the texts."""
    key = hashlib.sha256(tokenizer.hf.to_str().encode() + b"\0" + source_key.encode()).hexdigest()[:24]
    path = cache_dir() / f"corpus-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return _corpus(tokenizer, z["ids"].astype(np.int64), z["lengths"].astype(np.int64))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt, never trusted
    corpus = build_corpus(tokenizer, load_texts())
    lengths = np.diff(corpus.text_starts)
    small = np.uint16 if tokenizer.vocab_size < 65536 else np.int32
    _save_atomic(path, ids=corpus.ids.astype(small), lengths=lengths)
    return corpus


def _corpus(tokenizer: Tokenizer, ids: np.ndarray, lengths: np.ndarray) -> TokenCorpus:
    if len(ids) == 0:
        raise ValueError("the text corpus is empty")
    text_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    newline = tokenizer.encode("\n")
    line_starts = text_starts[:-1]
    if len(newline) == 1:  # the tokenizer keeps "\n" as its own token: lines start right after it
        line_starts = np.union1d(line_starts, np.flatnonzero(ids == newline[0]) + 1)
    return TokenCorpus(ids, text_starts, line_starts[line_starts < len(ids)])


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write then rename, so concurrent ranks and killed runs never leave a half-written cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the re-tokenization next time


_MEMO: dict[tuple[str, str], TokenCorpus] = {}


def shakespeare_corpus(tokenizer: Tokenizer, split: str) -> TokenCorpus:
    """Tokenized Shakespeare of a split ('train': training plays, 'test': the held-out plays), memoised."""
    key = (hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest(), split)
    if key not in _MEMO:
        _MEMO[key] = cached_corpus(tokenizer, f"shakespeare/{split}/{shakespeare.fingerprint(split)}",
                                   lambda: shakespeare.load_texts(split))
    return _MEMO[key]
