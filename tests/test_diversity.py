"""Sample diversity measures (evaluate/diversity.py): collapse scores ~0, real-vs-real ~1."""

import numpy as np
import pytest
import torch

from transfusion.evaluate.diversity import diversity_report, per_prompt_spread, precision_recall


class FeatureStub:
    """A classifier whose features are the flattened image (the measures only need a feature map)."""

    def features(self, images):
        return images.flatten(1).double().numpy()


def _prompts(n_prompts=4, per=5):
    items = torch.arange(n_prompts).repeat_interleave(per)
    return items, torch.zeros_like(items)


def test_collapsed_samples_have_no_spread_and_real_vs_itself_is_one():
    items, colours = _prompts()
    g = torch.Generator().manual_seed(0)
    real = torch.rand(len(items), 3, 4, 4, generator=g) * 2 - 1
    collapsed = real[items * 5]  # every sample of a prompt is the same image
    rep = diversity_report(FeatureStub(), collapsed, real, items, colours)
    assert rep["diversity_ratio"] == 0.0
    same = diversity_report(FeatureStub(), real, real, items, colours)
    assert same["diversity_ratio"] == pytest.approx(1.0)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert rep["recall"] < 0.5  # four points cannot cover twenty


def test_precision_drops_for_samples_off_the_real_manifold():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 8))
    precision, recall = precision_recall(real + 100.0, real)
    assert precision == 0.0 and recall == 0.0
    with pytest.raises(ValueError, match="needs more than 3"):
        precision_recall(real[:3], real)


def test_prompts_with_one_sample_are_left_out():
    feats = np.eye(3)
    items, colours = torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long)
    assert per_prompt_spread(feats, items, colours) is None
