"""A full disk while a checkpoint is written (ENOSPC, simulated by an os.fsync that fails mid-save).

Defined outcome: the save raises CheckpointWriteError (one `error:` line, exit 2 through the CLI) saying the disk
is full; the temp directory is removed at once; `latest` and every published checkpoint are untouched, so the
previous checkpoint verifies, loads and resumes. (On a real 8 MiB tmpfs the same run stops with the same line.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import write_micro_config  # noqa: E402

from transfusion import config  # noqa: E402
from transfusion.checkpoint import dcp  # noqa: E402
from transfusion.checkpoint import layout as ck  # noqa: E402
from transfusion.checkpoint.export import load_for_inference, save_export  # noqa: E402
from transfusion.cli import main  # noqa: E402
from transfusion.model.build import build_model  # noqa: E402

REAL_FSYNC = os.fsync


def _enospc(*_: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FailingFsync:
    """os.fsync that raises ENOSPC at its `fail_at`-th call (0-based) and counts the calls."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, fd: int) -> None:
        n, self.calls = self.calls, self.calls + 1
        if n == self.fail_at:
            _enospc()
        REAL_FSYNC(fd)


def _micro() -> tuple[config.Config, torch.nn.Module, torch.optim.Optimizer]:
    cfg = config.load(None, ["model.preset=micro"])
    model = build_model(cfg.model, seed=0)
    return cfg, model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _leftovers(run: Path) -> list[str]:
    return [p.name for p in (run / ck.CKPT_SUBDIR).iterdir() if p.name.startswith(".")]


def test_enospc_at_every_point_of_a_save_keeps_the_last_checkpoint(tmp_path, monkeypatch) -> None:
    """Fail the n-th fsync of a save, for every n: DCP shards, train_state/config/manifest, the rename, `latest`."""
    cfg, model, opt = _micro()
    pristine = tmp_path / "pristine"
    dcp.save(pristine, 1, model, opt, cfg, {"n": 1})
    counter = FailingFsync()
    monkeypatch.setattr(os, "fsync", counter)
    dcp.save(tmp_path / "count", 2, model, opt, cfg, {"n": 2})
    assert counter.calls >= 8  # shards, metadata, 5 small files, manifest, directories, latest
    with torch.no_grad():
        model.norm.weight.fill_(7.0)  # step 2's weights differ from step 1's
    for n in range(counter.calls):
        run = tmp_path / f"fail_at_{n}"
        shutil.copytree(pristine, run)
        monkeypatch.setattr(os, "fsync", FailingFsync(fail_at=n))
        with pytest.raises(ck.CheckpointWriteError) as e:
            dcp.save(run, 2, model, opt, cfg, {"n": 2})
        monkeypatch.setattr(os, "fsync", REAL_FSYNC)
        msg = str(e.value)
        assert "disk is full" in msg and "nothing already saved is lost" in msg and "\n" not in msg
        assert _leftovers(run) == [], n  # the temp directory and a half-written `latest` are gone
        latest = ck.find_latest(run)
        assert f"{latest} is complete and `latest` points to it" in msg
        ck.verify(latest)
        loaded, _, _ = load_for_inference(latest)
        expect = 7.0 if latest.name == "step_00000002" else 1.0
        assert float(loaded.norm.weight[0].detach()) == expect, n
        if n < counter.calls - 3:  # every fsync before the rename into place: step 1 stays the latest
            assert latest.name == "step_00000001" and not (run / ck.CKPT_SUBDIR / "step_00000002").exists(), n


def test_export_to_a_full_disk(tmp_path, monkeypatch) -> None:
    from safetensors import SafetensorError

    from transfusion.checkpoint import export

    cfg, model, _ = _micro()
    save_export(tmp_path, 1, model, cfg)
    # safetensors (Rust) reports ENOSPC as a SafetensorError carrying "(os error 28)", not as an OSError
    monkeypatch.setattr(export, "save_model", lambda *a, **k: (_ for _ in ()).throw(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")))
    with pytest.raises(ck.CheckpointWriteError, match="disk is full.*step_00000001 is complete.*run the export again"):
        save_export(tmp_path, 2, model, cfg)
    assert _leftovers(tmp_path) == [] and ck.find_latest(tmp_path).name == "step_00000001"


def test_trainer_stops_with_one_error_line_and_resumes(tmp_path, monkeypatch, capsys) -> None:
    """Through the CLI: the disk fills during the second of three saves; exit 2, one `error:` line, step 10 kept;
    after "freeing space" --resume finishes the run."""
    cfg_path = write_micro_config(tmp_path / "c.toml", steps=30, ckpt_every=10)
    run = tmp_path / "run"
    marker = run / ck.CKPT_SUBDIR / ".tmp-step_00000020"

    def full_from_step_20(fd: int) -> None:
        if marker.exists():  # the save of step 20 is under way: the disk is full from here on
            _enospc()
        REAL_FSYNC(fd)

    monkeypatch.setattr(os, "fsync", full_from_step_20)
    assert main(["train", str(cfg_path), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "disk is full" in lines[0] and "nothing already saved is lost" in lines[0]
    assert "step_00000010 is complete" in lines[0] and "--resume" in lines[0]
    assert sorted(p.name for p in (run / ck.CKPT_SUBDIR).iterdir()) == ["latest", "step_00000010"]
    monkeypatch.setattr(os, "fsync", REAL_FSYNC)
    assert main(["train", str(cfg_path), "--out", str(run), "--no-progress", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 30


# ------------------------------------------------------------------------------------------ two ranks


def _rank(rank: int, store_dir: str, run: str, out: str) -> None:
    """One of two gloo ranks: both save step 1; rank 1's disk is full for step 2. Writes its outcome to out."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        cfg, model, opt = _micro()
        dcp.save(run, 1, model, opt, cfg, {"n": 1})
        if rank == 1:
            os.fsync = _enospc  # this process only
        try:
            dcp.save(run, 2, model, opt, cfg, {"n": 2})
            result = {"raised": None}
        except ck.CheckpointError as e:
            result = {"raised": type(e).__name__, "msg": str(e)}
        Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_one_rank_out_of_space_stops_both_without_a_hang(tmp_path) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    run, outs = tmp_path / "run", [tmp_path / f"rank{r}.json" for r in range(2)]
    with tempfile.TemporaryDirectory() as store:
        procs = [ctx.Process(target=_rank, args=(r, store, str(run), str(outs[r]))) for r in range(2)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 240
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        assert not hung, "a rank hung after another rank's disk filled up"
    results = [json.loads(o.read_text()) for o in outs]
    assert all(r["raised"] == "CheckpointWriteError" for r in results), results
    assert "disk is full" in results[0]["msg"] and "step_00000001 is complete" in results[0]["msg"]
    assert _leftovers(run) == [] and ck.find_latest(run).name == "step_00000001"
    ck.verify(ck.find_latest(run))
