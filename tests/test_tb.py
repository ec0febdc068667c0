"""TensorBoard logging and MFU: a micro run writes event files that TensorBoard's own reader parses, with the
metrics.jsonl scalars (loss terms, lr, grad norm, tokens/s, MFU) and the sample grids; metrics.jsonl rows carry
`mfu`. The FLOP count and the peak FLOP/s table are checked on their own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import write_micro_config  # noqa: E402

from transfusion import config  # noqa: E402
from transfusion.metrics import read_metrics  # noqa: E402
from transfusion.model.flops import flops_per_token  # noqa: E402
from transfusion.train import mfu  # noqa: E402
from transfusion.train.tb import TB_DIR, RunLogger  # noqa: E402

pytest.importorskip("tensorboard")


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TB_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_micro_run_writes_tensorboard_events_and_mfu(tmp_path) -> None:
    from transfusion.train import train

    cfg = config.load(write_micro_config(tmp_path / "c.toml", steps=6, ckpt_every=0),
                      ["train.sample_n=2", "train.sample_every=3"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(isinstance(r["mfu"], float) and 0 < r["mfu"] < 1 for r in rows), rows[-1]
    assert list(rows[0]).index("mfu") == list(rows[0]).index("tokens_per_s") + 1  # read side by side

    acc = _events(run)
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/total", "loss/lm", "loss/diffusion", "optim/lr", "optim/grad_norm", "perf/tokens_per_s",
                "perf/mfu", "train/tokens_seen"):
        assert tag in tags, (tag, tags)
    loss = acc.Scalars("loss/total")
    assert [e.step for e in loss] == list(range(1, 7))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    assert [e.value for e in acc.Scalars("perf/mfu")] == pytest.approx([r["mfu"] for r in rows], rel=1e-4)
    grids = acc.Images("samples")  # the grid at step 3 and the final one at step 6
    assert [g.step for g in grids] == [3, 6] and grids[0].width > 0


def test_resume_purges_what_the_killed_run_logged_past_the_checkpoint(tmp_path) -> None:
    cfg = config.load(write_micro_config(tmp_path / "c.toml"))
    logger = RunLogger(tmp_path, cfg, "cpu", 1)
    for step in range(1, 6):  # the killed run logged steps 1..5, its checkpoint was at 3
        logger.log({"step": step, "loss": 10.0 + step, "tokens_per_s": 100.0})
    logger.close()
    logger = RunLogger(tmp_path, cfg, "cpu", 1, resume_step=3)
    for step in range(4, 7):
        logger.log({"step": step, "loss": 20.0 + step, "tokens_per_s": 100.0})
    logger.close()
    loss = _events(tmp_path).Scalars("loss/total")
    assert [(e.step, e.value) for e in loss] == [(1, 11), (2, 12), (3, 13), (4, 24), (5, 25), (6, 26)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_without_the_tensorboard_package_a_note_and_metrics_jsonl(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = config.load(write_micro_config(tmp_path / "c.toml"))
    logger = RunLogger(tmp_path, cfg, "cpu", 1)
    logger.log({"step": 1, "loss": 1.0, "tokens_per_s": 10.0})
    logger.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorboard package is not installed" in err
    assert not (tmp_path / TB_DIR).exists() and read_metrics(tmp_path / "metrics.jsonl")[0]["mfu"] > 0
    cfg.train.tensorboard = False  # switched off: no note
    RunLogger(tmp_path / "off", cfg, "cpu", 1).close()
    assert capsys.readouterr().err == ""


def test_flops_per_token_and_peaks(monkeypatch) -> None:
    from transfusion.model.build import build_model

    mc = config.ModelConfig.from_name("micro")
    # 6 FLOPs per weight but the embedding table and LM head (2 x vocab x dim), + dense attention 12 L d T
    weights = build_model(mc, device="meta").num_params() - 2 * 2048 * 64
    assert flops_per_token(mc, seq_len=128) == 6 * weights + 12 * 2 * 64 * 128
    assert weights > 2 * (4 * 64 * 64 + 3 * 64 * 256)  # the layers' matrices are in it

    cfg = config.load(None, ["model.preset=micro"])
    peak, source = mfu.peak_flops(cfg, "cpu")
    assert peak == pytest.approx(92.5e9 * torch.get_num_threads()) and "DESIGN.md" in source
    cfg.train.bf16 = True
    assert mfu.peak_flops(cfg, "cpu")[0] == pytest.approx(200e9 * torch.get_num_threads())
    cfg.train.peak_tflops = 1.5
    assert mfu.peak_flops(cfg, "cpu") == (1.5e12, "train.peak_tflops")
    cfg.train.peak_tflops = 0.0
    for name, expect in (("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                         ("NVIDIA A10G", None), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
        assert mfu.peak_flops(cfg, "cuda")[0] == expect, name
    m = mfu.MFU(cfg, "cuda", world_size=1)  # unknown GPU: mfu is null, never a guess
    assert m(1e6) is None and "train.peak_tflops" in m.source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    two = mfu.MFU(cfg, "cuda", world_size=2)
    assert two(1e6) == pytest.approx(round(two.flops_per_token * 1e6 / (2 * 989e12), 4))
    assert json.loads(json.dumps({"mfu": m(5.0)})) == {"mfu": None}
