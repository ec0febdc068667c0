"""End-to-end training: the loss falls, kill -9 + resume reproduces every per-step loss, NaN steps are skipped,
and bad resumes fail with clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transfusion.checkpoint import layout as ck
from transfusion import config
from transfusion.checkpoint import dcp as dcpc
from transfusion.checkpoint.export import save_export
from transfusion.model.build import build_model
from transfusion.metrics import read_metrics
from transfusion.train import TrainingDiverged, train

from train_helpers import write_micro_config

TRANSFUSION = [sys.executable, "-m", "transfusion.cli"]


def test_thirty_steps_loss_falls(tmp_path) -> None:
    cfg = config.load(write_micro_config(tmp_path / "c.toml", steps=30), ["train.ema=0.9"])
    summary = train(cfg, tmp_path / "run", progress=False)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 31))
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert recs[-1]["diffusion_loss"] < recs[0]["diffusion_loss"]
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"]
    assert summary["skipped_steps"] == 0 and summary["steps"] == 30
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in recs)
    train_s = [r["train_s"] for r in recs]  # cumulative step time: the x axis of time-to-quality
    assert train_s[0] > 0 and all(b > a for a, b in zip(train_s, train_s[1:]))
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    assert _weights(tmp_path / "run")[1] is not None  # the checkpoint carries the EMA
    assert config.load(tmp_path / "run" / "config.toml").train.ema == 0.9


def _weights(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(training weights, EMA or None) of a run's latest (DCP) checkpoint, read on one process."""
    ckpt = ck.resolve(run)
    model = build_model(ck.read_config(ckpt).model)
    ema = dcpc.load_into_plain(ckpt, model)
    return model.state_dict(), ema


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def test_kill9_and_resume_gives_identical_losses(tmp_path) -> None:
    """An uninterrupted run vs one SIGKILLed right after its first checkpoint and resumed: every per-step loss
    (and the final weights and EMA) must be identical. Uses bf16 autocast, grad accumulation and EMA."""
    extra = "bf16 = true\ngrad_accum = 2\nema = 0.9\nkeep_checkpoints = 0"
    cfg_path = write_micro_config(tmp_path / "c.toml", steps=30, ckpt_every=10, extra=extra)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    base = TRANSFUSION + ["train", str(cfg_path), "--no-progress", "--out"]
    subprocess.run(base + [str(ref)], check=True, env=env, capture_output=True)

    proc = subprocess.Popen(base + [str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while ck.find_latest(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = ck.find_latest(killed)
    assert saved is not None
    killed_at = max(_losses(killed), default=0)
    assert killed_at < 30, "the run finished before it could be killed; the test proves nothing"

    subprocess.run(base + [str(killed), "--resume"], check=True, env=env, capture_output=True)
    a, b = _losses(ref), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    diffs = {s: abs(a[s] - b[s]) for s in a}
    assert max(diffs.values()) <= 1e-6, {s: d for s, d in diffs.items() if d > 1e-6}
    for wa, wb in zip(_weights(ref), _weights(killed)):  # weights, then EMA
        assert wa is not None and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the step clock travels with the checkpoint: after the resume it goes on from the saved value
    clock = {r["step"]: r["train_s"] for r in read_metrics(killed / "metrics.jsonl")}
    assert all(clock[s + 1] > clock[s] for s in range(1, 30))


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch) -> None:
    import transfusion.train.step as losses  # the trainer step calls its transfusion_loss

    real = losses.transfusion_loss
    calls = {"n": 0}

    def flaky(*args, **kw):
        out = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # steps 3 and 4 blow up
            out.loss = out.loss * float("nan")
            out.lm_loss = out.lm_loss * float("nan")
        return out

    monkeypatch.setattr(losses, "transfusion_loss", flaky)
    cfg = config.load(write_micro_config(tmp_path / "c.toml", steps=8, ckpt_every=0))
    summary = train(cfg, tmp_path / "run", progress=False)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["skipped_steps"] == 2
    assert [r["step"] for r in recs if r["skipped"]] == [3, 4]
    assert recs[-1]["skipped_steps"] == 2 and recs[-1]["loss"] == recs[-1]["loss"]  # finite again


def test_too_many_bad_steps_stop_the_run(tmp_path, monkeypatch) -> None:
    import transfusion.train.step as losses  # the trainer step calls its transfusion_loss

    real = losses.transfusion_loss

    def broken(*args, **kw):
        out = real(*args, **kw)
        out.loss = out.loss * float("inf")
        out.diffusion_loss = out.diffusion_loss * float("inf")
        return out

    monkeypatch.setattr(losses, "transfusion_loss", broken)
    cfg = config.load(write_micro_config(tmp_path / "c.toml", steps=20, ckpt_every=0), ["train.max_bad_steps=3"])
    with pytest.raises(TrainingDiverged, match="4 consecutive steps"):
        train(cfg, tmp_path / "run", progress=False)


def test_resume_errors(tmp_path) -> None:
    cfg_path = write_micro_config(tmp_path / "c.toml", steps=4, ckpt_every=2)
    train(config.load(cfg_path), tmp_path / "run", progress=False)
    with pytest.raises(config.ConfigError, match="--resume"):
        train(config.load(cfg_path), tmp_path / "run", progress=False)
    with pytest.raises(ck.CheckpointError, match="model.n_layers: checkpoint 2 vs config 3"):
        train(config.load(cfg_path, ["model.n_layers=3", "train.steps=6"]), tmp_path / "run", resume=True,
              progress=False)
    # a single-file export has no optimiser shards: it samples, but cannot resume training
    export = save_export(tmp_path / "exported", 4, build_model(config.load(cfg_path).model),
                                config.load(cfg_path))
    with pytest.raises(ck.CheckpointError, match="single-file"):
        train(config.load(cfg_path, ["train.steps=6"]), export.parent.parent, resume=True, progress=False)
    # longer schedule, same model: resumes from step 4 and finishes
    summary = train(config.load(cfg_path, ["train.steps=6"]), tmp_path / "run", resume=True, progress=False)
    assert summary["steps"] == 6
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tmp_path) -> None:
    cfg_path = write_micro_config(tmp_path / "c.toml", steps=500, ckpt_every=0)
    run = tmp_path / "run"
    proc = subprocess.Popen(TRANSFUSION + ["train", str(cfg_path), "--no-progress", "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(read_metrics(run / "metrics.jsonl")) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "interrupted at step" in err
    last = max(_losses(run))
    assert last < 500
    assert ck.resolve(run).name == ck.step_name(last)  # the checkpoint is exactly the last finished step
