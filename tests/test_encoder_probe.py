"""benchmarks/encoder_probe.py (docs/results.md, Table 5): runs on linear and U-Net checkpoints and reports
bounded, sane numbers; a decoder given another image's transformer output changes its prediction."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from train_helpers import write_micro_config
from transfusion.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _probe_module():
    spec = importlib.util.spec_from_file_location("encoder_probe", ROOT / "benchmarks" / "encoder_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_probe_reports_every_measure_on_a_trained_run(tmp_path: Path, encoder: str) -> None:
    cfg = write_micro_config(tmp_path / "c.toml", steps=2, ckpt_every=2)
    opts = ["--set", f"model.patch_encoder={encoder}", "--set", "model.unet_width=8"]
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", *opts]) == 0
    out = _probe_module().probe(str(tmp_path / "run"), n=8)
    assert out["encoder"] == encoder
    for key in ("decoder_reads_caption_t900", "decoder_reads_h_t500", "lm_prefers_right_colour",
                "encoder_colour_change", "encoder_constant_share"):
        assert out[key] >= 0.0, key
    assert 0.0 <= out["lm_prefers_right_colour"] <= 1.0 and 0.0 <= out["encoder_constant_share"] <= 1.0 + 1e-6
    assert out["decoder_reads_h_t900"] > 0.0  # another image's hidden states give another prediction
    json.dumps(out)
