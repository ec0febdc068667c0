"""Checkpoints: round trip, atomicity under SIGKILL, corruption and config-mismatch errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from transfusion import checkpoint as ck
from transfusion import config


def _cfg(**model: object) -> config.Config:
    return config.load(None, ["model.preset=micro"] + [f"model.{k}={v}" for k, v in model.items()])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16))


def _save(run: Path, step: int, model: nn.Module, cfg: config.Config, **kw) -> Path:
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": {"g": torch.Generator().manual_seed(1).get_state()},
             "loader": {"epoch": 1, "cursor": 123, "name": "x", "big": 2**100}}
    return ck.save_checkpoint(run, step, model, cfg, train_state=state, **kw)


def test_round_trip_and_latest(tmp_path) -> None:
    cfg, model = _cfg(), _model()
    ema = {n: p.detach().float().clone() + 1 for n, p in model.named_parameters()}
    _save(tmp_path, 10, model, cfg)
    path = _save(tmp_path, 20, model, cfg, ema_state=ema)
    assert ck.resolve(tmp_path) == path == ck.find_latest(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    fresh = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16))
    loaded = ck.load_checkpoint(tmp_path, fresh, cfg)
    assert loaded.step == 20 and loaded.train_state["loader"]["big"] == 2**100
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert set(ck.load_ema_state(path)) == set(ema)
    assert loaded.config.model == cfg.model
    opt = torch.optim.AdamW(fresh.parameters())
    opt.load_state_dict(loaded.train_state["optimizer"])


def test_keep_prunes_old_checkpoints(tmp_path) -> None:
    cfg, model = _cfg(), _model()
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, model, cfg, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "delete_state", "bad_manifest"])
def test_corrupt_checkpoint_gives_clear_error(tmp_path, damage: str) -> None:
    cfg, model = _cfg(), _model()
    path = _save(tmp_path, 5, model, cfg)
    weights = path / ck.MODEL_FILE
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (path / ck.MANIFEST_FILE).unlink()
    elif damage == "delete_state":
        (path / ck.STATE_FILE).unlink()
    else:
        (path / ck.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(path, _model(), cfg)
    assert str(path) in str(e.value) or "no checkpoint" in str(e.value)


def test_truncated_weights_without_manifest_check(tmp_path) -> None:
    path = _save(tmp_path, 5, _model(), _cfg())
    w = path / ck.MODEL_FILE
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(ck.CheckpointError, match="cannot load weights"):
        ck.load_checkpoint(path, _model(), _cfg(), check=False)


def test_pickled_code_is_refused(tmp_path) -> None:
    """train_state.pt is read with weights_only=True: an arbitrary object in it is an error, not executed."""
    path = _save(tmp_path, 5, _model(), _cfg())
    torch.save({"step": 5, "evil": ck.LoadedCheckpoint}, path / ck.STATE_FILE)
    with pytest.raises(ck.CheckpointError, match="unreadable"):
        ck.load_train_state(path)


def test_different_model_config_is_named(tmp_path) -> None:
    path = _save(tmp_path, 5, _model(), _cfg())
    with pytest.raises(ck.CheckpointError, match=r"model.dim: checkpoint 64 vs config 128"):
        ck.load_checkpoint(path, _model(), _cfg(dim=128))


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.resolve(tmp_path / "nope")
    with pytest.raises(ck.CheckpointError, match="no checkpoint found"):
        ck.resolve(tmp_path)
    assert ck.find_latest(tmp_path) is None


def test_sigkill_during_saves_never_leaves_a_broken_latest(tmp_path) -> None:
    """A process saving checkpoints in a loop is SIGKILLed at several moments; whatever `latest` points to
    must verify and load, and half-written temp directories are ignored."""
    script = textwrap.dedent(f"""
        import torch, torch.nn as nn
        from transfusion import checkpoint as ck, config
        cfg = config.load(None, ["model.preset=micro"])
        model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512))
        step = 0
        while True:
            step += 1
            with torch.no_grad():
                model[0].bias.fill_(step)
            ck.save_checkpoint({str(tmp_path)!r}, step, model, cfg, train_state={{"x": torch.zeros(1000)}}, keep=3)
            print(step, flush=True)
    """)
    for delay in (0.6, 1.0, 1.5):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        time.sleep(delay + 1.5)  # import time + some saves
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = ck.find_latest(tmp_path)
        if latest is None:
            continue
        ck.verify(latest)
        model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512))
        loaded = ck.load_checkpoint(latest, model, config.load(None, ["model.preset=micro"]))
        assert float(model[0].bias[0].detach()) == loaded.step
        # the next run's save cleans up the killed process's temp directory
        for p in (tmp_path / "checkpoints").iterdir():
            assert p.name.startswith(("step_", "latest", ".tmp-", ".latest", ".old-"))
    assert ck.find_latest(tmp_path) is not None
