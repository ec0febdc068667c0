"""Byte-level BPE tokenizer with the special tokens of the mixed-modal sequence (paper §3).

Byte-level means every string round-trips exactly (no unknown tokens), which matters because the model must
reproduce captions and prompts faithfully. The vocabulary (2,048 for the tiny demo model) is trained with HF
`tokenizers` on the Shakespeare training plays plus every caption phrasing (scripts/build_tokenizer.py) and
shipped as `assets/tokenizer.json`, so a run never depends on retraining it.

Special tokens take the first ids, in this order: PAD 0, BOS 1, EOS 2, BOI 3, EOI 4.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, BOI, EOI = "<pad>", "<bos>", "<eos>", "<boi>", "<eoi>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, BOI, EOI)
DEFAULT_PATH = Path(__file__).parent / "assets" / "tokenizer.json"
REBUILD_HINT = "rebuild it with `.venv/bin/python scripts/build_tokenizer.py`"


class TokenizerError(ValueError):
    """The tokenizer file is missing, unreadable or lacks the special tokens."""


class Tokenizer:
    """Thin wrapper: `encode` never adds specials (the data pipeline places BOS/EOS/BOI/EOI itself)."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        self.hf = hf
        self.source = source
        # user text that spells "<boi>" must stay text: only the data pipeline places special tokens
        hf.encode_special_tokens = True
        ids = {tok: hf.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"tokenizer {source} lacks special tokens {missing}; {REBUILD_HINT}")
        self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id = (ids[t] for t in SPECIAL_TOKENS)
        self.special_ids: frozenset[int] = frozenset(ids.values())

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Tokenizer":
        """Load `path`, or the shipped `assets/tokenizer.json` when path is None or ""."""
        path = Path(path) if path else DEFAULT_PATH
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} not found; {REBUILD_HINT}")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, Exception) as e:  # tokenizers raises Exception
            raise TokenizerError(f"tokenizer file {path} is corrupt ({type(e).__name__}: {e}); {REBUILD_HINT}") from None
        return cls(hf, str(path))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(valid_unicode(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (multi-threaded in `tokenizers`): used to tokenize corpora and captions."""
        return [e.ids for e in self.hf.encode_batch([valid_unicode(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.hf.to_str(pretty=True) + "\n", encoding="utf-8")


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD (a surrogate pair becomes its character).

    Found by fuzzing (tests/test_fuzz.py): `tokenizers` raises a bare TypeError on a str that is not valid
    Unicode, and such strings reach us from a command-line argument holding invalid UTF-8 (Python decodes argv
    with surrogateescape) or a JSON caption that spells "\\ud800". Every other string passes unchanged."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# the specials plus all 256 byte symbols: below this a byte-level BPE has no room for a single merge
MIN_VOCAB = len(SPECIAL_TOKENS) + 256


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` (deterministic for the same texts in the same order)."""
    if vocab_size < MIN_VOCAB:  # `tokenizers` would silently return a larger vocabulary than asked
        raise TokenizerError(f"vocab size {vocab_size} is below {MIN_VOCAB}: the {len(SPECIAL_TOKENS)} special "
                             "tokens and 256 byte symbols come first")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
