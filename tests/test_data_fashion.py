"""Colour fashion: held-out combinations never trained on, deterministic colours, subset and examples."""

import numpy as np
import pytest
import torch

from transfusion.data import colour_fashion as cf
from transfusion.data import fashion
from transfusion.tokenizer import Tokenizer


def combos(split, full):
    _, labels, index = cf.load_split(split, full)
    colours = cf.assign_colours(index, labels, split)
    return {(int(i), int(c)) for i, c in zip(labels, colours)}


@pytest.mark.parametrize("full", [False, True])
def test_heldout_never_in_train_and_test_has_all(full):
    if full and fashion.fashion_dir() is None:
        pytest.skip("full Fashion-MNIST not installed")
    train = combos("train", full)
    assert not train & fashion.HELDOUT
    assert len(train) == 80 - len(fashion.HELDOUT)
    assert combos("test", full) == {(i, c) for i in range(10) for c in range(8)}


def test_colours_are_a_function_of_the_index():
    idx, labels = np.arange(1000), np.arange(1000) % 10
    a = cf.assign_colours(idx, labels, "train")
    assert np.array_equal(a, cf.assign_colours(idx, labels, "train"))
    # the same image keeps its colour whether it comes from the subset or elsewhere (order independent)
    perm = np.random.default_rng(0).permutation(1000)
    assert np.array_equal(cf.assign_colours(idx[perm], labels[perm], "train"), a[perm])
    assert np.bincount(a, minlength=8).min() > 80  # all colours used, roughly evenly


def test_subset_is_small_balanced_and_pickle_free():
    assert cf.SUBSET_PATH.stat().st_size < 3_000_000
    with np.load(cf.SUBSET_PATH, allow_pickle=False) as z:
        assert z["train_images"].shape == (3000, 28, 28) and z["train_images"].dtype == np.uint8
        assert z["test_images"].shape == (1000, 28, 28)
        assert np.bincount(z["train_labels"]).tolist() == [300] * 10


def test_set_renders_tinted_images_and_captions():
    tok = Tokenizer.load()
    s = cf.colour_fashion_set(tok, "train", 28, use_full_dataset=False)
    x = s.render(np.array([0, 1, 2]))
    assert x.shape == (3, 3, 28, 28) and x.min() >= -1 and x.max() <= 1
    item, colour = int(s.labels[0]), int(s.colours[0])
    texts = {tok.decode(c) for c in s.caption_sets[int(s.caption_of[0])]}
    assert texts == set(fashion.all_captions(item, colour))
    assert torch.equal(x[:1], fashion.tint(cf.load_split("train", False)[0][:1], s.colours[:1], 28))


def test_fashion_examples_for_evaluation():
    ex = cf.fashion_examples("test", n=40, seed=3, use_full_dataset=False)
    assert ex.images.shape == (40, 3, 28, 28) and len(ex.captions) == 40
    assert ex.captions[0] == fashion.caption(int(ex.items[0]), int(ex.colours[0]))
    again = cf.fashion_examples("test", n=40, seed=3, use_full_dataset=False)
    assert torch.equal(ex.images, again.images)
    held = cf.fashion_examples("test", n=20, seed=0, use_full_dataset=False, combos=set(fashion.HELDOUT))
    assert all((int(i), int(c)) in fashion.HELDOUT for i, c in zip(held.items, held.colours))


def test_fallback_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(fashion, "fashion_dir", lambda: None)
    monkeypatch.setattr(cf, "_warned", set())
    cf.load_split.cache_clear()
    try:
        images, _, _ = cf.load_split("train", True)
        cf.load_split("test", True)
    finally:
        cf.load_split.cache_clear()
    assert len(images) == 3000
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "apt-get install dataset-fashion-mnist" in err


@pytest.mark.parametrize("size,k", [(28, 4), (8, 2)])
def test_numpy_patches_equal_patchify_of_tint(size, k):
    from transfusion.images import patchify

    s = cf.colour_fashion_set(Tokenizer.load(), "test", size, use_full_dataset=False)
    idx = np.array([5, 0, 999, 5])
    ref = patchify(s.render(idx), k).reshape(-1, 3 * k * k)
    assert torch.equal(s.patches(idx, k), ref)
