"""benchmarks/quality_sweep.py: a variant trains through the public trainer and its samples get scored."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from transfusion.evaluate.classifier import ClassifierConfig, get_classifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality_sweep  # noqa: E402

QUICK = ClassifierConfig(epochs=1, n_train=12_000)  # the cache entry test_eval_report.py uses


def test_parse_variant():
    assert quality_sweep.parse_variant("base=") == ("base", [])
    assert quality_sweep.parse_variant("v=diffusion.prediction=v,model.patch_pos_emb=true") == (
        "v", ["diffusion.prediction=v", "model.patch_pos_emb=true"])
    with pytest.raises(SystemExit):
        quality_sweep.parse_variant("=x=1")


def test_one_variant_trains_and_is_scored(tmp_path):
    from transfusion.data import fashion

    try:
        fashion.load_fashion_mnist("test")
    except fashion.DatasetMissing:  # the item classifier trains on the full set (`make data`)
        pytest.skip("Fashion-MNIST not installed")
    rec = quality_sweep.run_variant(
        str(ROOT / "configs" / "tiny.toml"), "v",
        ["diffusion.prediction=v", "diffusion.sample_steps=2", "train.batch_size=2", "train.ckpt_every=1"],
        tmp_path, steps=1, n=4, device="cpu", clf=get_classifier(QUICK, progress=False))
    assert rec["steps"] == 1 and rec["ema"] is None  # the demo config trains without EMA
    assert rec["raw"]["n"] == 4 and 0.0 <= rec["raw"]["both"] <= 1.0
    assert (tmp_path / "v_raw_grid.png").is_file()
