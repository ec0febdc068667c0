"""The `transfusion eval` report end to end on an untrained micro checkpoint (mechanics, keys, files), the
ranked-classification scorer against a plain full-sequence forward, and perplexity bookkeeping."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transfusion import config
from transfusion.checkpoint.export import save_export
from transfusion.data import fashion
from transfusion.evaluate import report as rep
from transfusion.evaluate.classifier import ClassifierConfig, get_classifier
from transfusion.evaluate.clip import ClipConfig
from transfusion.evaluate.perplexity import perplexity
from transfusion.evaluate.ranked import caption_logprobs
from transfusion.images import patchify
from transfusion.tokenizer import Tokenizer
from transfusion.model.build import build_model

QUICK = ClassifierConfig(epochs=1, n_train=12_000)  # same cache entry as test_eval_calibration.py
QUICK_CLIP = ClipConfig(steps=40, batch_size=32)  # the image-text scorer's mechanics only (cached after one run)
# every key colour fashion's report had before the suite became dataset-driven, with its sub-keys
COLOUR_FASHION_KEYS = {
    "alignment": {"item", "colour", "both", "both_seen", "both_heldout", "item_heldout", "colour_heldout", "n",
                  "n_heldout"},
    "caption_accuracy": {"item", "colour", "both"},
    "ranked": {"accuracy", "item", "colour", "n", "n_candidates"},
    "diversity": {"diversity_ratio", "spread_generated", "spread_real", "precision", "recall", "k"},
}


def _micro(**model) -> tuple[config.Config, torch.nn.Module]:
    cfg = config.load(None, ["model.preset=micro"] + [f"model.{k}={v}" for k, v in model.items()])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def test_caption_logprobs_match_full_forward(tok) -> None:
    cfg, model = _micro()
    model.eval()
    image = torch.rand(3, 8, 8) * 2 - 1
    caps = ["a red sneaker", "an orange ankle boot", "white bag"]
    got = caption_logprobs(model, tok, image, caps)
    n = cfg.model.patches_per_image
    for k, cap in enumerate(caps):  # independent reference: one row, no cache
        seq = [tok.bos_id, tok.boi_id] + [tok.pad_id] * n + [tok.eoi_id] + tok.encode(cap) + [tok.eos_id]
        L = len(seq)
        tokens = torch.tensor([seq])
        image_ids = torch.full((1, L), -1)
        image_ids[0, 2 : 2 + n] = 0
        x = patchify(image[None], cfg.model.patch_size)[0]
        with torch.no_grad():
            out = model(tokens, image_ids, torch.zeros(1, L, dtype=torch.long), torch.arange(L)[None], x,
                        torch.zeros(n, dtype=torch.long))
        logp = F.log_softmax(out.logits[0, :-1].float(), -1).gather(1, tokens[0, 1:, None]).squeeze(1)
        assert float(got[k]) == pytest.approx(float(logp[3 + n - 1 :].sum()), abs=1e-3)


def test_perplexity_counts_every_token_once() -> None:
    cfg, model = _micro()
    ids = np.arange(1, 301) % 500
    res = perplexity(model.eval(), ids, bos_id=1, window=64, batch_size=3)
    assert res.n_tokens == 300 and res.n_windows == 5  # 63 tokens per window
    assert np.isfinite(res.perplexity) and res.perplexity > 1


def test_report_end_to_end(tmp_path: Path, tok) -> None:
    try:
        fashion.load_fashion_mnist("test")
    except fashion.DatasetMissing:
        pytest.skip("Fashion-MNIST not installed")
    cfg, model = _micro()
    run = tmp_path / "run"
    save_export(run, 0, model, cfg, tokenizer=tok)
    clf = get_classifier(QUICK, progress=False)
    rep.SUITES["test"] = rep.Suite(n_samples=6, n_captions=4, n_ranked=2, ppl_tokens=256, fid=False)
    try:
        out = tmp_path / "eval" / "report.json"
        r = rep.evaluate(run, suite="test", out=out, steps=2, classifier=clf, clip_config=QUICK_CLIP, progress=False)
    finally:
        del rep.SUITES["test"]
    on_disk = json.loads(out.read_text())
    for key in ("fid", "fd_classifier", "diversity", "alignment", "cider", "caption_accuracy", "perplexity",
                "ranked_accuracy", "n_samples", "sampler", "steps", "cfg", "seconds"):
        assert key in on_disk, key
    assert set(on_disk["alignment"]) >= {"item", "colour", "both", "both_heldout"}
    for key in ("fd_classifier", "classifier_test_accuracy", "caption_examples", "n_real", "n_captions",
                "grids", "skipped_metrics", "clip_score", "clip_retrieval", "clip_real"):
        assert key in on_disk, key
    for key, sub in COLOUR_FASHION_KEYS.items():
        assert set(on_disk[key]) >= sub, key
    assert on_disk["ranked"]["n_candidates"] == 80 and set(on_disk["skipped_metrics"]) <= {"fid", "perplexity"}
    assert on_disk["clip_real"]["n_candidates"] == 80 and isinstance(on_disk["clip_score"], float)
    assert on_disk["n_samples"] == 6 and on_disk["steps"] == 2 and on_disk["fid"] is None
    assert out.with_suffix(".md").read_text().startswith("# Evaluation")
    assert (tmp_path / "eval" / "report_grid.png").is_file()
    assert len(r["grids"]) >= 1 and all(Path(g).is_file() for g in r["grids"])


def test_wrong_config_checkpoint_is_a_clear_error(tmp_path: Path, tok) -> None:
    cfg, model = _micro(image_channels=1)
    save_export(tmp_path / "gray", 0, model, cfg, tokenizer=tok)
    with pytest.raises(rep.EvalError, match="image_channels=1"):
        rep.evaluate(tmp_path / "gray", out=tmp_path / "r.json", progress=False)


def test_cli_args_and_folder_mode(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    rep.add_eval_args(p)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "prompts.jsonl").write_text('{"image": "gone.png", "prompt": "a red bag"}\n')
    args = p.parse_args(["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "r.json"), "--no-fid"])
    assert rep.run_eval(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["n_skipped"] == 1 and r["n_samples"] == 0
    with pytest.raises(SystemExit):
        p.parse_args(["--suite", "fast"])  # needs --ckpt or --images


def test_default_report_path_is_with_the_run_not_the_current_directory(tmp_path: Path, tok) -> None:
    cfg, model = _micro()
    run = tmp_path / "run"
    step = save_export(run, 3, model, cfg, tokenizer=tok)
    assert rep.default_out(str(run), None, "fast") == run / "eval" / "fast.json"
    assert rep.default_out(str(step), None, "full") == run / "eval" / "full.json"  # a step dir: its run's eval/
    assert rep.default_out(None, str(tmp_path / "imgs"), "fast") == tmp_path / "imgs" / "eval" / "report.json"
    assert rep.default_out(str(tmp_path / "nope"), None, "fast") == tmp_path / "nope" / "eval" / "fast.json"
