"""The dataset-driven evaluation: colour fashion's hooks give what the fixed suite used to compute, the generic
attribute summary gives colour fashion's numbers, and a dataset without attributes (a user folder) is evaluated
with the metrics that apply, the others null with their reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfusion import config
from transfusion.checkpoint.export import save_export
from transfusion.data import fashion
from transfusion.data.dataset import Dataset
from transfusion.data.registry import get_dataset
from transfusion.evaluate import alignment, attributes, clip
from transfusion.evaluate import report as rep
from transfusion.model.build import build_model
from transfusion.tokenizer import Tokenizer

QUICK_CLIP = clip.ClipConfig(steps=40, batch_size=32)  # mechanics only: a few seconds


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="module")
def fashion_subset() -> Dataset:
    return get_dataset(config.load(None, ["data.use_full_dataset=false"]).data)


def test_colour_fashion_hooks(fashion_subset) -> None:
    ds = fashion_subset
    assert ds.attributes() == {"item": list(fashion.ITEMS), "colour": list(fashion.COLOUR_NAMES)}
    p = ds.eval_prompts(40, seed=3, heldout_share=0.25)
    assert len(p.prompts) == 40 and int(p.heldout.sum()) >= 10
    for text, i, c, held in zip(p.prompts, p.labels["item"], p.labels["colour"], p.heldout):
        assert ds.parse_caption(text) == {"item": int(i), "colour": int(c)}
        assert bool(held) == ((int(i), int(c)) in fashion.HELDOUT)
    real = ds.reference_images(p, seed=0, image_size=16)
    assert real.shape == (40, 3, 16, 16) and real.min() >= -1 and real.max() <= 1
    assert torch.equal(alignment.read_colours(real)[0], p.labels["colour"])  # tinted as asked
    refs = ds.caption_references(p.labels)
    assert all(text in r and len(r) == len(fashion.TEMPLATES) for text, r in zip(p.prompts, refs))
    assert set(ds.examples("test", 4, seed=0, image_size=28).labels) == {"item", "colour"}


def test_summary_gives_colour_fashions_numbers() -> None:
    """attributes.summarise over item + colour = alignment.AlignmentResult.summary, key for key."""
    gen = torch.Generator().manual_seed(0)
    items, colours = torch.randint(0, 10, (200,), generator=gen), torch.randint(0, 8, (200,), generator=gen)
    item_pred = torch.where(torch.rand(200, generator=gen) < 0.7, items, torch.randint(0, 10, (200,), generator=gen))
    colour_pred = torch.where(torch.rand(200, generator=gen) < 0.8, colours, torch.full_like(colours, -1))
    held = alignment.is_heldout(items, colours)
    old = alignment.AlignmentResult(items, colours, item_pred, colour_pred, item_pred == items,
                                    colour_pred == colours, (item_pred == items) & (colour_pred == colours),
                                    held).summary()
    new = attributes.summarise({"item": items, "colour": colours}, {"item": item_pred, "colour": colour_pred}, held)
    assert set(new) >= set(old)
    for key, value in old.items():
        assert new[key] == pytest.approx(value), key
    assert new["all"] == new["both"] and new["all_heldout"] == new["both_heldout"]


def test_unasked_attribute_is_left_out() -> None:
    labels = {"name": torch.tensor([0, 1, 2]), "tone": torch.tensor([-1, 1, 0])}
    pred = {"name": torch.tensor([0, 1, 0]), "tone": torch.tensor([3, 1, 0])}
    s = attributes.summarise(labels, pred)
    assert s["name"] == pytest.approx(2 / 3) and s["tone"] == 1.0  # row 0 asks no tone
    assert s["all"] == pytest.approx(2 / 3) and s["all_heldout"] is None
    only_tone = attributes.summarise({"tone": labels["tone"]}, pred, torch.tensor([True, False, False]))
    assert only_tone["all"] == 1.0 and only_tone["all_heldout"] is None  # row 0 asks nothing: not counted


class _Unreadable(Dataset):
    name = "unreadable"

    def image_set(self, tokenizer, split, image_size, channels):
        raise FileNotFoundError("no images here")

    def sample_prompts(self, n):
        return []


def test_no_scorer_is_a_reason_not_a_crash() -> None:
    skipped: dict[str, str] = {}
    reader, scorer = rep._scorers(_Unreadable(config.DataConfig()), 8, None, QUICK_CLIP, {}, skipped, False)
    assert reader is None and scorer is None
    assert set(skipped) == {"clip_score", "clip_retrieval", "clip_real"}
    assert "no images here" in skipped["clip_score"]


def _shapes_folder(root: Path) -> None:
    """48 images: 4 colours x 3 shapes x 4 noisy copies, captions like 'a red square'."""
    rng = np.random.default_rng(0)
    colours = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30)}
    yy, xx = np.mgrid[:16, :16]
    masks = {"square": (abs(yy - 8) < 5) & (abs(xx - 8) < 5), "disc": (yy - 8) ** 2 + (xx - 8) ** 2 < 30,
             "bar": abs(yy - 8) < 2}
    lines = []
    for cname, rgb in colours.items():
        for shape, mask in masks.items():
            for k in range(4):
                im = rng.integers(0, 30, (16, 16, 3)).astype(np.uint8)
                im[mask] = rgb
                name = f"{cname}_{shape}_{k}.png"
                Image.fromarray(im).save(root / name)
                lines.append(json.dumps({"image": name, "caption": f"a {cname} {shape}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def test_eval_on_a_folder_dataset_skips_what_does_not_apply(tmp_path: Path, tok, monkeypatch) -> None:
    monkeypatch.setenv("TRANSFUSION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "shapes").mkdir()
    _shapes_folder(tmp_path / "shapes")
    cfg = config.load(None, ["model.preset=micro", "data.dataset=folder", f"data.folder={tmp_path / 'shapes'}"])
    torch.manual_seed(0)
    save_export(tmp_path / "run", 0, build_model(cfg.model), cfg, tokenizer=tok)
    rep.SUITES["test"] = rep.Suite(n_samples=6, n_captions=4, n_ranked=2, ppl_tokens=256, fid=False)
    try:
        out = tmp_path / "eval" / "report.json"
        r = rep.evaluate(tmp_path / "run", suite="test", out=out, steps=2, clip_config=QUICK_CLIP, progress=False)
    finally:
        del rep.SUITES["test"]
    on_disk = json.loads(out.read_text())
    assert on_disk["dataset"] == "folder"
    skipped = on_disk["skipped_metrics"]
    for key in ("alignment", "caption_accuracy", "fd_classifier"):
        assert on_disk[key] is None and key in skipped, key
    assert "defines no attributes" in skipped["alignment"] and "fid" in skipped  # --no-fid equivalent
    assert isinstance(on_disk["clip_score"], float) and -100 <= on_disk["clip_score"] <= 100
    real = on_disk["clip_real"]
    assert {"top1_real", "top1_shuffled", "clip_score", "retrieval", "train_seconds"} <= set(real)
    assert real["n_candidates"] == 12  # the folder's distinct captions
    assert 0 <= on_disk["clip_retrieval"]["top1"] <= 1 and on_disk["clip_retrieval"]["n_candidates"] == 12
    assert isinstance(on_disk["cider"], float) and 0 <= on_disk["ranked_accuracy"] <= 1
    assert on_disk["diversity"]["features"] == "clip"
    assert "classifier_test_accuracy" not in on_disk  # no attribute classifier for a folder
    md = out.with_suffix(".md").read_text()
    assert "alignment not computed" in md and "clip_score" in md
    assert len(r["grids"]) >= 1 and list((tmp_path / "cache").glob("clip-folder-8px-*.safetensors"))


def test_alignment_scores_only_what_the_reader_reads() -> None:
    """Emoji's reader reads the tone only: name and style are listed as not read, never counted wrong."""
    from transfusion.evaluate.eval_set import EvalSet
    from transfusion.evaluate.text_to_image import alignment_metrics

    es = EvalSet(prompts=["a", "b", "c"], heldout=torch.tensor([False, False, True]), real=None,
                 labels={"emoji": torch.tensor([0, 1, 2]), "tone": torch.tensor([1, -1, 2]),
                         "style": torch.tensor([0, 1, 0])})
    report: dict = {"skipped_metrics": {}}
    alignment_metrics(report, {}, torch.zeros(3, 3, 8, 8), es, lambda x: {"tone": torch.tensor([1, 0, 0])}, "fake")
    a = report["alignment"]
    assert a["not_read"] == ["emoji", "style"] and "emoji" not in a
    assert a["tone"] == 0.5 and a["all_seen"] == 1.0 and a["all_heldout"] == 0.0
    report = {"skipped_metrics": {}}
    alignment_metrics(report, {}, torch.zeros(3, 3, 8, 8), es, lambda x: {"size": torch.zeros(3)}, "fake")
    assert report["alignment"] is None and "reads none of" in report["skipped_metrics"]["alignment"]


def tiny_eval(run: Path, out_dir: Path) -> dict:
    """The suite at its smallest (4 samples, 2 captions, 2 ranked, no FID, the quick scorer) on a run; the JSON
    report as written. Shared by the tests of eval on other model families and data paths."""
    out = out_dir / "eval" / "report.json"
    rep.SUITES["test"] = rep.Suite(n_samples=4, n_captions=2, n_ranked=2, ppl_tokens=128, fid=False)
    try:
        rep.evaluate(run, suite="test", out=out, steps=2, clip_config=QUICK_CLIP, progress=False)
    finally:
        del rep.SUITES["test"]
    return json.loads(out.read_text())
