"""Sequence building: example order, noise limit, BOI/EOI placement, caption dropout, text:image mix."""

import numpy as np
import pytest

from transfusion.data.image_text import ImageTextSet
from transfusion.data.mixture import DocumentSampler, MixtureSpec
from transfusion.data.sequences import PATCH, Layout, Specials, image_document, text_document

SP = Specials(pad=0, bos=1, eos=2, boi=3, eoi=4)
N_PATCH = 16


def spec(**kw) -> MixtureSpec:
    base = dict(text_ratio=0.0, image_first_prob=0.2, caption_dropout=0.1, patches_per_image=N_PATCH,
                num_train_steps=1000, noise_limit=500, max_text_tokens=100)
    return MixtureSpec(**{**base, **kw})


def tiny_images(n: int = 10) -> ImageTextSet:
    import torch
    return ImageTextSet(
        pixels=torch.zeros(n, 3, 8, 8, dtype=torch.uint8),
        caption_of=np.arange(n),
        caption_sets=[[np.array([10 + i, 20]), np.array([30, 10 + i, 40, 50])] for i in range(n)],
        image_size=8,
    )


def draw_image_docs(n: int, seed: int = 0, **kw):
    sampler = DocumentSampler(np.random.default_rng(seed), spec(**kw), SP, tiny_images(), None)
    return [sampler.image() for _ in range(n)]


def test_order_and_dropout_rates():
    docs = draw_image_docs(20_000)
    layouts = [d.layout for d in docs]
    dropped = layouts.count(Layout.UNCONDITIONAL) / len(docs)
    image_first = layouts.count(Layout.IMAGE_FIRST)
    captioned = len(docs) - layouts.count(Layout.UNCONDITIONAL)
    assert abs(dropped - 0.1) < 0.01
    assert abs(image_first / captioned - 0.2) < 0.015  # 80/20 among captioned examples


def test_configured_rates_are_followed():
    layouts = [d.layout for d in draw_image_docs(5000, image_first_prob=0.5, caption_dropout=0.0)]
    assert Layout.UNCONDITIONAL not in layouts
    assert abs(layouts.count(Layout.IMAGE_FIRST) / len(layouts) - 0.5) < 0.03


def test_noise_limit_only_on_image_first():
    for d in draw_image_docs(2000):
        assert d.max_t == (500 if d.layout is Layout.IMAGE_FIRST else 999), d.layout


@pytest.mark.parametrize("layout", [Layout.CAPTION_FIRST, Layout.IMAGE_FIRST, Layout.UNCONDITIONAL])
def test_boi_eoi_surround_patches(layout):
    cap = np.array([7, 8, 9])
    d = image_document(cap, 0, N_PATCH, layout, SP, 1000, 500)
    t = d.tokens
    span = np.flatnonzero(t == PATCH)
    assert len(span) == N_PATCH and np.all(np.diff(span) == 1) and span[0] == d.image_start
    assert t[span[0] - 1] == SP.boi and t[span[-1] + 1] == SP.eoi
    assert t[0] == SP.bos and t[-1] == SP.eos
    rest = np.delete(t, np.r_[0, span[0] - 1, span, span[-1] + 1, len(t) - 1])
    if layout is Layout.CAPTION_FIRST:
        assert list(t[1:4]) == [7, 8, 9] and span[0] == 5
    elif layout is Layout.IMAGE_FIRST:
        assert t[1] == SP.boi and list(t[-4:-1]) == [7, 8, 9]
    else:
        assert len(rest) == 0 and len(t) == N_PATCH + 4


def test_text_document():
    assert list(text_document(np.array([5, 6]), SP).tokens) == [1, 5, 6, 2]
    assert list(text_document(np.array([5, 6]), SP, complete=False).tokens) == [1, 5, 6]


def test_caption_alternatives_are_all_used():
    docs = draw_image_docs(500, caption_dropout=0.0, image_first_prob=0.0)
    lengths = {len(d) for d in docs}
    assert lengths == {N_PATCH + 4 + 2, N_PATCH + 4 + 4}
