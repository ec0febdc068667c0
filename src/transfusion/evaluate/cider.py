"""Image→text scores: CIDEr-D against every reference phrasing, and exact item/colour read from a caption.

CIDEr-D is `pycocoevalcap`'s `Cider` (install with `pip install --no-deps pycocoevalcap`). Its usual front end,
the PTB tokenizer, needs Java; we tokenise ourselves instead: lower-case, punctuation stripped, hyphens inside
words kept ("t-shirt" stays one token, as in the references). Its IDF comes from the evaluated set's references,
so CIDEr is only meaningful over a set covering several item/colour combinations: over a single combination
every n-gram has zero IDF and every caption scores 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transfusion.data import fashion

# surface forms that name an item, longest first so "ankle boot" wins over "boot" and "t-shirt" over "shirt"
_ITEM_WORDS: dict[str, int] = {
    "ankle boots": 9, "ankle boot": 9, "t-shirts": 0, "t-shirt": 0, "t shirt": 0, "tshirt": 0, "tee": 0,
    "trousers": 1, "trouser": 1, "pants": 1, "pullovers": 2, "pullover": 2, "sweater": 2, "dresses": 3,
    "dress": 3, "coats": 4, "coat": 4, "sandals": 5, "sandal": 5, "shirts": 6, "shirt": 6, "sneakers": 7,
    "sneaker": 7, "bags": 8, "bag": 8, "boots": 9, "boot": 9,
}
_COLOUR_WORDS: dict[str, int] = {name: i for i, name in enumerate(fashion.COLOUR_NAMES)}
_COLOUR_WORDS.update({"violet": fashion.COLOUR_NAMES.index("purple"), "grey": -1, "gray": -1})


def tokenize(text: str) -> str:
    """Lower-case, punctuation -> space (hyphens inside words kept), whitespace collapsed."""
    text = text.lower()
    text = re.sub(r"[^a-z0-9\s-]", " ", text)
    text = re.sub(r"(?<![a-z0-9])-|-(?![a-z0-9])", " ", text)  # a hyphen not joining two word characters
    return " ".join(text.split())


def _find_first(text: str, words: dict[str, int]) -> int:
    """Id of the earliest-mentioned word of `words` in tokenised text (-1 if none); longer forms win ties."""
    best_pos, best_id = len(text) + 1, -1
    taken: list[tuple[int, int]] = []
    for word in sorted(words, key=len, reverse=True):
        for m in re.finditer(rf"(?<![a-z0-9-]){re.escape(word)}(?![a-z0-9-])", text):
            if any(a <= m.start() < b for a, b in taken):
                continue  # inside a longer form already found ("shirt" in "t shirt")
            taken.append((m.start(), m.end()))
            if m.start() < best_pos:
                best_pos, best_id = m.start(), words[word]
    return best_id


def parse_caption(text: str) -> tuple[int, int]:
    """(item id, colour id) named in a caption, -1 for each not found. 'a red t-shirt' -> (0, 0)."""
    tokens = tokenize(text)
    return _find_first(tokens, _ITEM_WORDS), _find_first(tokens, _COLOUR_WORDS)


@dataclass
class CaptionScores:
    cider: float  # CIDEr-D over the set (pycocoevalcap's scale: 10 x mean cosine, identical captions ~ up to 10)
    per_caption: list[float]
    item: float  # share of captions naming the right item
    colour: float
    both: float
    n: int


def cider_d(candidates: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """CIDEr-D of candidates[i] against references[i] (each a list of strings), our tokenisation."""
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return 0.0, []
    res = {i: [tokenize(c)] for i, c in enumerate(candidates)}
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    if any(not refs for refs in gts.values()):
        raise ValueError("every candidate needs at least one reference")
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def score_captions(captions: list[str], items: list[int], colours: list[int]) -> CaptionScores:
    """CIDEr-D against fashion.all_captions(item, colour), plus exact item/colour accuracy parsed from text."""
    refs = [fashion.all_captions(int(i), int(c)) for i, c in zip(items, colours)]
    cider, per = cider_d(captions, refs)
    parsed = [parse_caption(c) for c in captions]
    item_ok = [p[0] == int(i) for p, i in zip(parsed, items)]
    colour_ok = [p[1] == int(c) for p, c in zip(parsed, colours)]
    n = len(captions)

    def share(flags: list[bool]) -> float:
        return sum(flags) / n if n else 0.0

    both = [a and b for a, b in zip(item_ok, colour_ok)]
    return CaptionScores(cider, per, share(item_ok), share(colour_ok), share(both), n)
