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
