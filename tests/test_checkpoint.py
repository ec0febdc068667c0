"""Checkpoints (export format + the shared layout): round trip, atomicity under SIGKILL, corruption and
config-mismatch errors. The training format (DCP) is tested in test_train.py and test_distributed.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from transfusion import config
from transfusion.checkpoint import layout as ck
from transfusion.checkpoint.export import load_for_inference, save_export
from transfusion.model.build import build_model


def _cfg(**model: object) -> config.Config:
    return config.load(None, ["model.preset=micro"] + [f"model.{k}={v}" for k, v in model.items()])


def _save(run: Path, step: int, seed: int = 0, **kw) -> tuple[Path, torch.nn.Module]:
    cfg = _cfg()
    model = build_model(cfg.model, seed=seed)
    return save_export(run, step, model, cfg, **kw), model


def test_round_trip_and_latest(tmp_path) -> None:
    _save(tmp_path, 10)
    ema = {n: p.detach().float().clone() + 1 for n, p in build_model(_cfg().model, seed=1).named_parameters()}
    path, model = _save(tmp_path, 20, seed=2, ema_state=ema)
    assert ck.resolve(tmp_path) == path == ck.find_latest(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    raw, cfg, where = load_for_inference(tmp_path, use_ema=False)
    assert where == path and cfg.model == _cfg().model and not raw.training
    for (n, a), b in zip(model.state_dict().items(), raw.state_dict().values()):
        assert torch.equal(a, b), n
    with_ema, _, _ = load_for_inference(tmp_path)
    for n, p in with_ema.named_parameters():
        assert torch.equal(p, ema[n]), n
    manifest = json.loads((path / ck.MANIFEST_FILE).read_text())
    assert manifest["step"] == 20 and set(manifest["files"]) == {ck.MODEL_FILE, ck.EMA_FILE, ck.CONFIG_FILE}


def test_keep_prunes_old_checkpoints(tmp_path) -> None:
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "delete_config", "bad_manifest"])
def test_corrupt_checkpoint_gives_clear_error(tmp_path, damage: str) -> None:
    path, _ = _save(tmp_path, 5)
    weights = path / ck.MODEL_FILE
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (path / ck.MANIFEST_FILE).unlink()
    elif damage == "delete_config":
        (path / ck.CONFIG_FILE).unlink()
    else:
        (path / ck.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ck.CheckpointError) as e:
        load_for_inference(path)
    assert str(path) in str(e.value) or "no checkpoint" in str(e.value)


def test_truncated_weights_without_manifest_check(tmp_path) -> None:
    path, _ = _save(tmp_path, 5)
    w = path / ck.MODEL_FILE
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(ck.CheckpointError, match="cannot load weights"):
        load_for_inference(path, check=False)


def test_different_model_config_is_named(tmp_path) -> None:
    path, _ = _save(tmp_path, 5)
    with pytest.raises(ck.CheckpointError, match=r"model.dim: checkpoint 64 vs config 128"):
        ck.check_model_config(ck.read_config(path).model, _cfg(dim=128).model, path)


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
        import torch
        from transfusion import config
        from transfusion.checkpoint.export import save_export
        from transfusion.model.build import build_model
        cfg = config.load(None, ["model.preset=micro", "model.dim=256", "model.n_layers=4"])
        model = build_model(cfg.model)
        step = 0
        while True:
            step += 1
            with torch.no_grad():
                model.norm.weight.fill_(step)
            save_export({str(tmp_path)!r}, step, model, cfg, keep=3)
            print(step, flush=True)
    """)
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # the first save is done (imports take seconds on a busy machine): kill during later ones
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = ck.find_latest(tmp_path)
        if latest is None:
            continue
        ck.verify(latest)
        model, _, _ = load_for_inference(latest)
        assert float(model.norm.weight[0].detach()) == json.loads((latest / ck.MANIFEST_FILE).read_text())["step"]
        for p in (tmp_path / "checkpoints").iterdir():
            assert p.name.startswith(("step_", "latest", ".tmp-", ".latest", ".old-"))
    assert ck.find_latest(tmp_path) is not None
