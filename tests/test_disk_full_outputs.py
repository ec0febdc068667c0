"""A full disk (ENOSPC) while the trainer writes what a person looks at: metrics.jsonl, TensorBoard, the PNGs.

Defined outcome (metrics.py docstring): a warning once per output, and training goes on without that output;
the checkpoints (whose own full-disk outcome tests/test_disk_full.py checks) are written as usual, and
metrics.jsonl never holds a torn line. Simulated by monkeypatching the writes to raise OSError(ENOSPC).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import write_micro_config  # noqa: E402

from transfusion import config  # noqa: E402
from transfusion.checkpoint import layout as ck  # noqa: E402
from transfusion.metrics import MetricsLogger, read_metrics  # noqa: E402

# TensorBoard's writer thread dies on the failed write and Python reports that once (pytest: in whichever test
# is running when the thread is collected): expected, it is how TensorBoard's writer fails
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def _enospc(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def warnings_seen(caplog):
    logger = logging.getLogger("transfusion")  # propagate=False: attach pytest's handler to it directly
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_a_failed_append_leaves_no_torn_line(tmp_path, monkeypatch) -> None:
    path = tmp_path / "metrics.jsonl"
    m = MetricsLogger(path)
    m.log({"step": 1, "loss": 1.0})
    real_write = os.write

    def half_then_enospc(fd: int, data) -> int:  # the disk fills mid-line: half written, then ENOSPC
        if len(data) > 4:
            return real_write(fd, bytes(data[: len(data) // 2]))
        _enospc()

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError) as e:
        m.log({"step": 2, "loss": 0.5})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "write", real_write)
    m.log({"step": 3, "loss": 0.25})  # space is back: the next line is whole and on its own
    assert path.read_text().count("\n") == 2
    assert [r["step"] for r in read_metrics(path)] == [1, 3]


def test_run_logger_warns_once_and_keeps_logging(tmp_path, monkeypatch, warnings_seen) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import record_writer

    from transfusion.metrics import MetricsLogger as ML
    from transfusion.train.tb import RunLogger

    cfg = config.load(None, ["model.preset=micro"])
    monkeypatch.setattr(record_writer.RecordWriter, "write", _enospc)  # every event write: the disk is full
    logger = RunLogger(tmp_path, cfg, "cpu", 1)
    real_log = ML.log
    calls = {"n": 0}

    def jsonl_full_on_second(self, record) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            _enospc()
        real_log(self, record)

    monkeypatch.setattr(ML, "log", jsonl_full_on_second)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 1.0 / step, "tokens_per_s": 100.0})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 3, 4, 5]
    assert logger.writer is None  # TensorBoard given up for the run
    text = warnings_seen.text
    assert text.count("metrics.jsonl not written") == 1 and text.count("TensorBoard events not written") == 1


def test_training_goes_on_when_logs_and_pngs_cannot_be_written(tmp_path, monkeypatch, warnings_seen) -> None:
    import matplotlib.figure
    from PIL import Image

    from transfusion.train import train

    monkeypatch.setattr(Image.Image, "save", _enospc)  # sample grids
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _enospc)  # loss_curve.png
    monkeypatch.setattr(MetricsLogger, "log", _enospc)  # metrics.jsonl
    cfg = config.load(write_micro_config(tmp_path / "c.toml", steps=4, ckpt_every=2),
                      ["train.sample_n=1", "train.sample_every=2", "train.tensorboard=false",
                       "diffusion.sample_steps=1"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    assert ck.find_latest(run).name.endswith("00000004")  # the checkpoints were written: the run completed
    assert not list(run.rglob("*.tmp.png")) and not list((run / "samples").glob("*.png"))
    for output in ("metrics.jsonl", "loss_curve.png", "sample grids"):
        assert warnings_seen.text.count(f"{output}") >= 1
    assert warnings_seen.text.count("not written") == 3  # once per output, though each failed twice or more
