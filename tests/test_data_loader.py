"""The loader: valid batches, determinism, exact resume, rank sharding, text:image mix, bad configs."""

import time

import pytest
import torch

from transfusion import config
from transfusion.batch import IGNORE
from transfusion.data.loader import build_loader
from transfusion.data.sequences import Specials
from transfusion.tokenizer import Tokenizer

FIELDS = ("tokens", "image_ids", "doc_ids", "positions", "lm_targets", "patches", "image_max_t")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def make_cfg(*overrides):
    return config.load(None, ["data.use_full_dataset=false", "train.batch_size=8", *overrides])


def same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def test_batches_are_valid_and_mixed(tok):
    cfg = make_cfg("train.batch_size=32")
    loader = build_loader(cfg, tok, split="test")
    m = cfg.model
    text_pos = image_pos = 0
    for _ in range(5):
        b = next(loader)
        b.validate(m.patch_dim, m.patches_per_image, m.vocab_size)
        assert b.shape == (32, cfg.data.seq_len)
        assert b.patches.min() >= -1 and b.patches.max() <= 1
        assert not (b.lm_targets == tok.pad_id).any()
        # documents of images vs text-only documents, by positions (patches counted as tokens)
        for r in range(b.shape[0]):
            for d in b.doc_ids[r].unique():
                sel = b.doc_ids[r] == d
                toks = b.tokens[r][sel]
                if (b.image_ids[r][sel] >= 0).any():
                    image_pos += int(sel.sum())
                elif (toks != tok.pad_id).any():
                    text_pos += int(sel.sum())
    assert abs(text_pos / (text_pos + image_pos) - cfg.data.text_ratio) < 0.03
    assert loader.stats.total == 0


def test_deterministic_and_resume_is_exact(tok):
    cfg = make_cfg()
    a = build_loader(cfg, tok, split="test")
    first = [next(a) for _ in range(4)]
    state = a.state_dict()
    rest = [next(a) for _ in range(2)]
    b = build_loader(cfg, tok, split="test")
    assert all(same(x, next(b)) for x in first)
    c = build_loader(cfg, tok, split="test")
    c.load_state_dict(state)
    assert all(same(x, next(c)) for x in rest)
    assert not same(first[0], first[1])
    other_seed = build_loader(make_cfg("train.seed=1"), tok, split="test")
    assert not same(first[0], next(other_seed))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_union_is_the_single_process_batch(tok, world_size):
    cfg = make_cfg()
    full = build_loader(cfg, tok, split="test").batch_at(3)
    parts = [build_loader(cfg, tok, split="test", rank=r, world_size=world_size).batch_at(3)
             for r in range(world_size)]
    for p in parts:
        assert p.shape == (8 // world_size, cfg.data.seq_len)
    for f in ("tokens", "image_ids", "doc_ids", "positions", "lm_targets"):
        if f == "image_ids":  # image ids are numbered per rank batch: compare the image/text pattern
            assert torch.equal(torch.cat([p.image_ids >= 0 for p in parts]), full.image_ids >= 0)
        else:
            assert torch.equal(torch.cat([getattr(p, f) for p in parts]), getattr(full, f)), f
    assert torch.equal(torch.cat([p.patches for p in parts]), full.patches)
    assert torch.equal(torch.cat([p.image_max_t for p in parts]), full.image_max_t)


def test_train_split_text_and_speed(tok):
    cfg = make_cfg("train.batch_size=32")
    loader = build_loader(cfg, tok, split="train")
    b = next(loader)
    sp = Specials.of(tok)
    assert (b.tokens == sp.bos).sum() > 32  # several documents per row
    start = time.perf_counter()
    for _ in range(5):
        next(loader)
    assert (time.perf_counter() - start) / 5 < 0.5  # a few ms when the machine is idle; loose under load


def test_images_only_and_text_only(tok):
    imgs = next(build_loader(make_cfg("data.text_ratio=0"), tok, split="test"))
    assert imgs.num_images > 0
    assert (imgs.lm_targets != IGNORE).any()  # captions still have targets
    text = next(build_loader(make_cfg("data.text_ratio=1"), tok, split="test"))
    assert text.num_images == 0 and text.patches.shape == (0, 48)


def test_bad_configs_are_clear_errors(tok):
    with pytest.raises(config.ConfigError, match="multiple of world_size"):
        build_loader(make_cfg("train.batch_size=6"), tok, split="test", world_size=4)
    with pytest.raises(config.ConfigError, match="data.seq_len"):
        build_loader(make_cfg("data.seq_len=40"), tok, split="test")
    with pytest.raises(config.ConfigError, match="vocab_size"):
        build_loader(make_cfg("model.vocab_size=1000"), tok, split="test")
    with pytest.raises(config.ConfigError, match="data.folder"):
        build_loader(make_cfg('data.dataset="folder"'), tok, split="test")
