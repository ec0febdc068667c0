"""Calibration of the alignment scorer and fd_classifier: real tinted test images scored as if generated set the
ceiling; noise and wrong colours must score near zero. Fast tests use a reduced-budget classifier (trained once,
then cached on disk); the full-budget classifier's >= 90% and alignment >= 0.9 are checked under -m slow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfusion.images import to_uint8
from transfusion.data import fashion
from transfusion.evaluate import alignment, fid
from transfusion.evaluate.classifier import ClassifierConfig, get_classifier, load_classifier_file, save_classifier
from transfusion.evaluate.reference import real_images, eval_prompts

try:
    fashion.load_fashion_mnist("test")
except fashion.DatasetMissing:
    pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)", allow_module_level=True)

QUICK = ClassifierConfig(epochs=1, n_train=12_000)  # ~10 s on 2 idle cores, ~85% test accuracy
N = 400


@pytest.fixture(scope="module")
def classifier():
    return get_classifier(QUICK, progress=False)


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return eval_prompts(N, seed=1, heldout_share=0.25)


def test_quick_classifier_is_usable(classifier) -> None:
    assert classifier.test_accuracy > 0.78


def test_real_heldout_images_calibrate(classifier, prompts) -> None:
    items, colours = prompts
    res = alignment.score_alignment(real_images(items, colours, seed=0), items, colours, classifier).summary()
    assert res["colour"] == 1.0 and res["colour_heldout"] == 1.0
    assert res["n_heldout"] >= 0.25 * N
    # item accuracy on these images is the classifier's own test accuracy, up to sampling noise
    assert res["item"] == pytest.approx(classifier.test_accuracy, abs=0.06)
    assert res["both_heldout"] >= classifier.test_accuracy - 0.08


def test_noise_scores_zero(classifier, prompts) -> None:
    items, colours = prompts
    noise = torch.rand(N, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    res = alignment.score_alignment(noise, items, colours, classifier).summary()
    assert res["colour"] == 0.0 and res["both"] == 0.0
    black = torch.full((4, 3, 28, 28), -1.0)
    assert (alignment.read_colours(black)[0] == alignment.UNKNOWN).all()


def test_wrong_colour_scores_zero(classifier, prompts) -> None:
    items, colours = prompts
    wrong = (colours + torch.randint(1, 8, colours.shape, generator=torch.Generator().manual_seed(2))) % 8
    res = alignment.score_alignment(real_images(items, wrong), items, colours, classifier).summary()
    assert res["colour"] == 0.0 and res["both"] == 0.0
    assert res["item"] > 0.75  # the item is still right


def test_colour_survives_png_round_trip() -> None:
    items, colours = eval_prompts(200, seed=3)
    x = torch.from_numpy(to_uint8(real_images(items, colours))).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(alignment.read_colours(x)[0], colours)


def test_fd_classifier_small_for_real_large_for_bad(classifier, prompts) -> None:
    items, colours = prompts
    real_a, real_b = real_images(items, colours, seed=0), real_images(items, colours, seed=1)
    noise = torch.rand(N, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    one_colour = real_images(items, torch.full_like(colours, 7), seed=1)  # every item white
    d_real = fid.fd_classifier(real_b, real_a, classifier)
    assert fid.fd_classifier(noise, real_a, classifier) > 20 * d_real
    assert fid.fd_classifier(one_colour, real_a, classifier) > 3 * d_real


def test_cache_round_trip(classifier, tmp_path) -> None:
    path = tmp_path / "clf.safetensors"
    save_classifier(classifier, path)
    again = load_classifier_file(path)
    x = real_images(*eval_prompts(16, seed=4))
    assert torch.equal(again.logits(x), classifier.logits(x))
    assert again.test_accuracy == classifier.test_accuracy and again.config == classifier.config


@pytest.mark.slow
def test_full_classifier_accuracy_and_calibration(prompts) -> None:
    clf = get_classifier(progress=False)
    assert clf.test_accuracy >= 0.90
    items, colours = prompts
    res = alignment.score_alignment(real_images(items, colours), items, colours, clf).summary()
    assert res["both"] >= 0.9 and res["both_heldout"] >= 0.85
    assert np.isfinite(fid.fd_classifier(real_images(items, colours, seed=1), real_images(items, colours), clf))


def test_diversity_of_real_images_is_about_one_and_collapse_is_caught(classifier, prompts) -> None:
    """Two independent real sets of the same prompts: spread ratio ~1, high precision and recall. The same prompts
    each drawn as one repeated real image (mode collapse) keep their alignment but lose the spread and the recall."""
    from transfusion.evaluate.diversity import diversity_report

    items, colours = prompts
    real_a, real_b = real_images(items, colours, seed=0), real_images(items, colours, seed=1)
    same = diversity_report(classifier, real_b, real_a, items, colours)
    assert 0.8 < same["diversity_ratio"] < 1.25 and same["precision"] > 0.8 and same["recall"] > 0.8
    keys = (items * 8 + colours).tolist()
    first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first sample of each prompt
    collapsed = real_b[torch.tensor([first[k] for k in keys])]
    col = diversity_report(classifier, collapsed, real_a, items, colours)
    assert col["diversity_ratio"] < 0.05 and col["recall"] < same["recall"] - 0.3
