"""CIDEr-D with our tokenisation, and item/colour parsed from captions."""

from __future__ import annotations

import pytest

from transfusion.data import fashion
from transfusion.evaluate.cider import cider_d, parse_caption, score_captions, tokenize

# hand-made pairs: several combinations so the IDF (computed from the evaluated references) is informative
ITEMS = [7, 8, 4, 3, 0, 9]
COLOURS = [0, 5, 3, 0, 7, 6]


def test_tokenize_keeps_inner_hyphens_only() -> None:
    assert tokenize("A Red T-Shirt!") == "a red t-shirt"
    assert tokenize("  - blue,  bag. ") == "blue bag"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red sneaker", (7, 0)),
        ("A photo of a purple ankle boot.", (9, 6)),
        ("white t-shirt on black", (0, 7)),
        ("a white shirt", (6, 7)),
        ("Cyan T shirt", (0, 4)),
        ("an orange bag", (8, 1)),
        ("green trousers", (1, 3)),
        ("something else entirely", (-1, -1)),
    ],
)
def test_parse_caption(text: str, expected: tuple[int, int]) -> None:
    assert parse_caption(text) == expected


def test_identical_caption_scores_highest() -> None:
    exact = [fashion.caption(i, c) for i, c in zip(ITEMS, COLOURS)]
    other_template = [fashion.caption(i, c, 1) for i, c in zip(ITEMS, COLOURS)]
    wrong_colour = [fashion.caption(i, (c + 1) % 8) for i, c in zip(ITEMS, COLOURS)]
    wrong_both = [fashion.caption((i + 3) % 10, (c + 2) % 8) for i, c in zip(ITEMS, COLOURS)]
    junk = ["the quick brown fox"] * len(ITEMS)
    s_exact, _ = cider_d(exact, [fashion.all_captions(i, c) for i, c in zip(ITEMS, COLOURS)])
    scores = {name: score_captions(caps, ITEMS, COLOURS).cider for name, caps in [
        ("exact", exact), ("other_template", other_template), ("wrong_colour", wrong_colour),
        ("wrong_both", wrong_both), ("junk", junk)]}
    assert scores["exact"] == pytest.approx(s_exact)
    assert scores["exact"] > scores["wrong_colour"] > scores["wrong_both"] >= scores["junk"] == 0.0
    assert scores["other_template"] > scores["wrong_colour"]


def test_per_caption_order_and_accuracy() -> None:
    caps = ["a red sneaker", "a red bag", "a photo of a green coat", "dress", "a white t-shirt", "a cat"]
    out = score_captions(caps, ITEMS, COLOURS)
    assert out.n == 6
    assert out.per_caption[0] > out.per_caption[1] > 0.0  # right vs wrong colour on the same item
    assert out.per_caption[5] == 0.0
    assert out.item == pytest.approx(5 / 6)  # all but the cat
    assert out.colour == pytest.approx(3 / 6)  # "a red bag" (blue), "dress" (no colour) and the cat are wrong
    assert out.both == pytest.approx(3 / 6)


def test_empty_and_mismatched() -> None:
    assert cider_d([], []) == (0.0, [])
    with pytest.raises(ValueError):
        cider_d(["a"], [])
