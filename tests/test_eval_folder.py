"""Scoring a folder of images from any generator: bad entries are skipped and counted, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from transfusion.images import to_uint8
from transfusion.data import fashion
from transfusion.evaluate.classifier import ClassifierConfig, get_classifier
from transfusion.evaluate.images_folder import load_images_folder, score_images_folder
from transfusion.evaluate.reference import real_images, eval_prompts

QUICK = ClassifierConfig(epochs=1, n_train=12_000)  # same cache entry as test_eval_calibration.py


def _write_folder(root: Path, n: int = 24) -> None:
    items, colours = eval_prompts(n, seed=5)
    imgs = to_uint8(real_images(items, colours))
    lines = []
    for k in range(n):
        name = f"img{k:03d}.png"
        size = 28 if k % 2 else 56  # other sizes are resized
        Image.fromarray(imgs[k]).resize((size, size)).save(root / name)
        entry = {"image": name, "prompt": fashion.caption(int(items[k]), int(colours[k]), k % 5)}
        if k % 3 == 0:  # labels given explicitly for some, parsed from the prompt for the rest
            entry.update(item=int(items[k]), colour=fashion.COLOUR_NAMES[int(colours[k])])
        lines.append(json.dumps(entry))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "truncated.png").write_bytes((root / "img001.png").read_bytes()[:60])
    lines += [
        json.dumps({"image": "corrupt.png", "prompt": "a red bag"}),
        json.dumps({"image": "truncated.png", "prompt": "a blue coat"}),
        json.dumps({"image": "missing.png", "prompt": "a red sneaker"}),
        json.dumps({"image": "img000.png", "prompt": "a lovely day"}),
        json.dumps({"prompt": "a red sneaker"}),
        "{not json",
        "",
    ]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")


def test_load_counts_skips(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    s = load_images_folder(tmp_path)
    assert s.images.shape == (24, 3, 28, 28)
    assert dict(s.skipped) == {
        "corrupt_image": 2, "missing_image": 1, "unparsed_prompt": 1, "no_image_field": 1, "bad_json": 1,
    }
    assert s.n_lines == 30


def test_score_folder(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    try:
        fashion.load_fashion_mnist("test")
    except fashion.DatasetMissing:
        pytest.skip("Fashion-MNIST not installed")
    _write_folder(tmp_path)
    clf = get_classifier(QUICK, progress=False)
    report = score_images_folder(tmp_path, classifier=clf, with_fid=False)
    assert report["n_samples"] == 24 and report["n_skipped"] == 6
    assert report["alignment"]["colour"] == 1.0
    assert report["alignment"]["item"] > 0.6
    assert report["fd_classifier"] is not None and report["fid"] is None


def test_empty_and_missing_listing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prompts.jsonl"):
        load_images_folder(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"image": "nope.png", "prompt": "a red bag"}\n')
    report = score_images_folder(tmp_path, with_fid=False)
    assert report["n_samples"] == 0 and report["skipped"] == {"missing_image": 1} and report["alignment"] is None
