"""The trainer's metrics hook: each logged row goes to metrics.jsonl with its MFU and, with `train.tensorboard`,
to TensorBoard event files in OUT/tensorboard/ along with the sample grids the trainer writes.

    logger = RunLogger(out, cfg, device, world_size, resume_step)   # rank 0 only, as metrics.jsonl always was
    logger.log(record)     # the row of metrics.jsonl: `mfu` added after `tokens_per_s`; scalars to TensorBoard
    logger.close()         # the last sample grid, flush

Scalars are tagged by group (loss/, optim/, perf/, train/) so TensorBoard shows the loss terms together. Sample
grids are picked up from OUT/samples/step_*.png when they appear (a new file, or one rewritten after a resume),
so the sampling code needs no hook. On resume the writer's `purge_step` tells TensorBoard to hide what the
killed run logged past the checkpoint, as MetricsLogger drops those lines from metrics.jsonl.
TensorBoard is optional (`pip install -e ".[tb]"`): without the package the run logs one note and goes on.
A full disk (metrics.py: DiskFullGuard) costs the output being written, never the run: metrics.jsonl skips that
line; TensorBoard stops for the rest of the run, because its writer thread dies on its first failed write (and
prints that exception once); the event files written so far stay readable.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from transfusion import config as config_mod
from transfusion.config import Config
from transfusion.log import log
from transfusion.metrics import DISK_FULL, DiskFullGuard, MetricsLogger
from transfusion.train.mfu import MFU

TB_DIR = "tensorboard"
SAMPLES_DIR = "samples"
TAGS = {"loss": "loss/total", "lm_loss": "loss/lm", "diffusion_loss": "loss/diffusion", "lr": "optim/lr",
        "grad_norm": "optim/grad_norm", "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu"}
_GRID = re.compile(r"step_(\d+)\.png$")


def open_writer(out: Path, resume_step: int | None) -> Any | None:
    """A SummaryWriter on OUT/tensorboard, or None (with a note) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is absent
        log.info('note: train.tensorboard is on but the tensorboard package is not installed (pip install -e '
                 '".[tb]"); logging to metrics.jsonl only')
        return None
    purge = None if resume_step is None else resume_step + 1  # the first step this process logs
    return SummaryWriter(str(out / TB_DIR), purge_step=purge, flush_secs=30)


class RunLogger:
    """metrics.jsonl (MetricsLogger, with `mfu`) plus TensorBoard; created on rank 0 only."""

    def __init__(self, out: Path, cfg: Config, device: torch.device | str, world_size: int,
                 resume_step: int | None = None):
        self.jsonl = MetricsLogger(out / "metrics.jsonl", resume_step=resume_step)
        self.mfu = MFU(cfg, device, world_size)
        self.samples = out / SAMPLES_DIR
        self.guard = DiskFullGuard()
        self.writer: Any | None = None
        if cfg.train.tensorboard:
            with self.guard("TensorBoard events"):
                self.writer = open_writer(out, resume_step)
        self.grids = self._grid_files()  # grids already there were logged by an earlier process (or are stale)
        if resume_step is None:
            self._tensorboard(lambda: self._intro(cfg))

    def _intro(self, cfg: Config) -> None:
        self.writer.add_text("config", "```toml\n" + config_mod.dump_toml(cfg) + "```", 0)
        self.writer.add_text("mfu", f"{self.mfu.flops_per_token / 1e6:.2f} MFLOP per token; peak: "
                                    f"{self.mfu.source}", 0)

    def _tensorboard(self, write: Callable[[], None]) -> None:
        """write() to TensorBoard; on a full disk the writer is dropped (its thread is dead) and the run goes on."""
        if self.writer is None:
            return
        try:
            write()
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            writer, self.writer = self.writer, None
            with contextlib.suppress(Exception):  # closing flushes, which fails again on the same disk
                writer.close()
            self.guard.warn("TensorBoard events", e)

    def log(self, record: dict[str, Any]) -> None:
        row: dict[str, Any] = {}
        for key, value in record.items():
            row[key] = value
            if key == "tokens_per_s":
                row["mfu"] = self.mfu(float(value))
        with self.guard("metrics.jsonl"):
            self.jsonl.log(row)
        self._tensorboard(lambda: (self._scalars(row), self._new_grids()))

    def close(self) -> None:
        self._tensorboard(lambda: (self._new_grids(), self.writer.close()))

    def _scalars(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # flags (`skipped`) and nulls (an unknown mfu) are not curves
            self.writer.add_scalar(TAGS.get(key, f"train/{key}"), float(value), step)
        if not math.isfinite(float(row.get("loss", 0.0))):
            self.writer.flush()  # a diverging run may be stopped soon: keep what led there

    def _grid_files(self) -> dict[str, int]:
        """Sample grids on disk: name -> modification time (a rewritten grid counts as new)."""
        if not self.samples.is_dir():
            return {}
        return {p.name: p.stat().st_mtime_ns for p in self.samples.glob("step_*.png") if _GRID.search(p.name)}

    def _new_grids(self) -> None:
        current = self._grid_files()
        for name, mtime in sorted(current.items()):
            if self.grids.get(name) == mtime:
                continue
            try:
                with Image.open(self.samples / name) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except OSError:  # being replaced right now: the next call sees the finished file
                continue
            self.writer.add_image("samples", pixels, int(_GRID.search(name).group(1)), dataformats="HWC")
            self.grids[name] = mtime
