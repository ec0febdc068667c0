"""A user's image-caption folder: bad entries are skipped and counted by reason."""

import json

import numpy as np
import pytest
from PIL import Image

from transfusion.data.folder import FolderDatasetError, load_folder
from transfusion.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def write_folder(root, entries, files):
    for name, content in files.items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            Image.fromarray(content).save(root / name)
    lines = [e if isinstance(e, str) else json.dumps(e) for e in entries]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def test_skips_and_counts_bad_entries(tmp_path, tok):
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 255
    gray = np.full((16, 16), 128, np.uint8)
    good_png = tmp_path / "x.png"
    Image.fromarray(red).save(good_png)
    write_folder(tmp_path, [
        {"image": "red.png", "caption": "a red square"},
        {"image": "gray.png", "caption": "a gray square"},
        {"image": "broken.png", "caption": "a broken file"},
        {"image": "truncated.png", "caption": "a truncated file"},
        {"image": "nowhere.png", "caption": "a missing file"},
        {"image": "red.png", "caption": "   "},
        {"image": "red.png", "caption": "word " * 80},
        "this is not json",
    ], {"red.png": red, "gray.png": gray, "broken.png": b"not an image at all",
        "truncated.png": good_png.read_bytes()[:60]})
    images, stats = load_folder(tmp_path, tok, image_size=8, max_caption_tokens=16)
    assert len(images) == stats.used == 2
    assert dict(stats.counts) == {"unreadable_image": 2, "missing_file": 1, "empty_caption": 1,
                                  "caption_too_long": 1, "bad_line": 1}
    assert stats.total == 6
    summary = stats.summary()
    assert "2 examples used, 6 skipped" in summary and "caption_too_long" in summary and "nowhere.png" in summary
    x = images.render(np.array([0, 1]))
    assert x.shape == (2, 3, 8, 8)
    assert x[0, 0].min() == 1.0 and x[0, 1].max() == -1.0  # red, converted to RGB and resized
    assert tok.decode(images.caption_sets[1][0]) == "a gray square"  # gray converted to RGB


def test_nothing_usable_is_a_clear_error(tmp_path, tok):
    write_folder(tmp_path, [{"image": "a.png", "caption": ""}], {})
    with pytest.raises(FolderDatasetError, match="no usable.*empty_caption"):
        load_folder(tmp_path, tok, 8, 16)
    with pytest.raises(FolderDatasetError, match="captions.jsonl"):
        load_folder(tmp_path / "missing", tok, 8, 16)


def test_folder_dataset_through_the_loader(tmp_path, tok):
    from transfusion import config
    from transfusion.data.loader import build_loader

    blue = np.zeros((10, 10, 3), np.uint8)
    blue[..., 2] = 200
    write_folder(tmp_path, [{"image": "b.png", "caption": "a blue square"}, {"image": "x.png", "caption": "x"}],
                 {"b.png": blue})
    cfg = config.load(None, ['data.dataset="folder"', f'data.folder="{tmp_path}"', "train.batch_size=4"])
    loader = build_loader(cfg, tok, split="test")
    batch = next(loader)
    batch.validate(cfg.model.patch_dim, cfg.model.patches_per_image, cfg.model.vocab_size)
    assert batch.num_images > 0
    assert loader.stats.used == 1 and dict(loader.stats.counts) == {"missing_file": 1}


def _squares(root, n):
    """n 6x6 images: image i is filled with value 10*i mod 256."""
    return {f"s{i}.png": np.full((6, 6, 3), (10 * i) % 256, np.uint8) for i in range(n)}


def test_several_captions_per_image(tmp_path, tok):
    write_folder(tmp_path, [
        {"image": "s0.png", "caption": ["a dark square", "  ", 7, "a very dark square"]},
        {"image": "s1.png", "captions": ["one", "word " * 40]},  # the over-long alternative is dropped
        {"image": "s2.png", "caption": ["word " * 40]},  # every alternative too long: skipped
        {"image": "s3.png", "caption": []},
    ], _squares(tmp_path, 4))
    images, stats = load_folder(tmp_path, tok, image_size=4, max_caption_tokens=16)
    assert [[tok.decode(c) for c in alts] for alts in images.caption_sets] == [
        ["a dark square", "a very dark square"], ["one"]]
    assert dict(stats.counts) == {"caption_too_long": 1, "empty_caption": 1}
    from transfusion.data.folder import FolderDataset
    from transfusion.config import DataConfig

    assert FolderDataset(DataConfig(dataset="folder", folder=str(tmp_path))).sample_prompts(2) == [
        "a dark square", "one"]


def test_split_field_marks_the_validation_images(tmp_path, tok):
    write_folder(tmp_path, [
        {"image": "s0.png", "caption": "zero", "split": "test"},
        {"image": "s1.png", "caption": "one"},  # unmarked in a marked folder: train
        {"image": "s2.png", "caption": "two", "split": "val"},
        {"image": "s3.png", "caption": "three", "split": "train"},
        {"image": "s4.png", "caption": "four", "split": "holdout"},  # unknown split: a bad line
    ], _squares(tmp_path, 5))
    train, tr_stats = load_folder(tmp_path, tok, 4, 16, split="train")
    test, te_stats = load_folder(tmp_path, tok, 4, 16, split="test")
    assert [tok.decode(c[0]) for c in train.caption_sets] == ["one", "three"]
    assert [tok.decode(c[0]) for c in test.caption_sets] == ["zero", "two"]
    assert dict(tr_stats.counts) == dict(te_stats.counts) == {"bad_line": 1}
    everything, _ = load_folder(tmp_path, tok, 4, 16)  # split=None: every line, as before splits existed
    assert len(everything) == 4


def test_hash_split_matches_shard_and_is_stable(tmp_path, tok):
    from transfusion.data.shards_writer import is_val

    n = 40
    entries = [{"image": f"s{i}.png", "caption": f"square {i}"} for i in range(n)]
    write_folder(tmp_path, entries, _squares(tmp_path, n))
    train, _ = load_folder(tmp_path, tok, 4, 16, split="train", val_fraction=0.25)
    test, _ = load_folder(tmp_path, tok, 4, 16, split="test", val_fraction=0.25)
    held = {tok.decode(c[0]) for c in test.caption_sets}
    assert held == {f"square {i}" for i in range(n) if is_val(f"s{i}.png", 0.25)}  # the split of its shards
    from transfusion.data import folder

    names = [f"img_{i}.jpg" for i in range(200)] + ["sub/\u00e9.png", "\udcff.png"]
    assert all(folder.is_val(x, f) == is_val(x, f) for x in names for f in (0.01, 0.3))  # one rule, written twice
    assert len(train) + len(test) == n and 0 < len(test) < n
    write_folder(tmp_path, entries[::-1] + [{"image": "s0.png", "caption": "square 0 again", "split": "train"}], {})
    test2, _ = load_folder(tmp_path, tok, 4, 16, split="test", val_fraction=0.25)
    assert {tok.decode(c[0]) for c in test2.caption_sets} == held  # order does not matter; a mark wins locally
    with pytest.raises(FolderDatasetError, match='no usable.*test split.*"split": "test"'):
        load_folder(tmp_path, tok, 4, 16, split="test", val_fraction=1e-9)


def test_unsplit_folder_serves_both_splits_with_a_warning(tmp_path, tok, caplog):
    write_folder(tmp_path, [{"image": "s0.png", "caption": "zero"}], _squares(tmp_path, 1))
    import logging

    logger = logging.getLogger("transfusion")
    logger.addHandler(caplog.handler)
    try:
        test, _ = load_folder(tmp_path, tok, 4, 16, split="test")
    finally:
        logger.removeHandler(caplog.handler)
    assert len(test) == 1 and "no validation split" in caplog.text
