"""Run outputs a person looks at: metrics.jsonl, the loss-curve PNG and image grids.

metrics.jsonl holds one JSON object per logged step. On resume the lines past the checkpoint's step (written by
the run that was killed) are dropped first, so the file always reads as one uninterrupted run.

A full disk (ENOSPC, or a quota: EDQUOT) while the trainer writes one of these outputs warns once per output and
training goes on without it (`DiskFullGuard`). Why not stop: these files are for looking at, the run's state is
in its checkpoints, and a checkpoint write on the same full disk already stops the run with one error line and
the previous checkpoint intact (checkpoint/layout.py), at the next `train.ckpt_every`; stopping earlier, for a
log line, would only throw away the steps since the last checkpoint. Each later write is tried again, so the
outputs resume when space comes back; metrics.jsonl then has a gap, never a torn line (a failed append is cut
back to where it started).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from transfusion.images import to_uint8
from transfusion.log import log

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullGuard:
    """`with guard("metrics.jsonl"): write()`: a full disk during write() is a warning (the first time for that
    output) and the run goes on; any other error propagates. See the module docstring for why."""

    def __init__(self) -> None:
        self.failed: set[str] = set()

    @contextlib.contextmanager
    def __call__(self, output: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            self.warn(output, e)

    def warn(self, output: str, error: OSError) -> None:
        """The warning, once per output."""
        if output not in self.failed:
            self.failed.add(output)
            log.warning(f"{output} not written: {os.strerror(error.errno or 0)}; training goes on without it "
                        "(the next checkpoint stops the run if the disk is still full)")


class MetricsLogger:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self.truncate_after(resume_step)

    def truncate_after(self, step: int) -> None:
        """Keep only records with record['step'] <= step (a killed run may have logged past its checkpoint)."""
        kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Append one line, whole or not at all: a failed write (a full disk) is cut back before it raises, so
        a line written once space is back does not glue onto a torn one."""
        data = memoryview((json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n").encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them readable instead of writing invalid JSON
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (process killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, target: str = "eps") -> None:
    """Total, LM and diffusion losses against step (log y), written atomically. `target` names what the
    diffusion loss regresses: "eps", "v" or "velocity" (diffusion.prediction / diffusion.objective)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_metrics(metrics_path) if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "total"), ("lm_loss", "LM (text)"), ("diffusion_loss", f"diffusion ({target} MSE)")):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if pts:
            ax.plot(*zip(*pts), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if recs:
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no half PNG behind


def make_grid(
    images: Tensor,
    nrow: int,
    scale: int = 4,
    pad: int = 2,
    borders: list[tuple[int, int, int] | None] | None = None,
) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one RGB PIL image, `nrow` images per row, each upscaled x`scale` (nearest,
    so pixels stay visible). `borders[i]`, if set, colours image i's frame (e.g. red for held-out prompts)."""
    arr = to_uint8(images)  # (N, H, W, C)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    N, H, W, _ = arr.shape
    h, w = H * scale, W * scale
    cols = max(1, min(nrow, N))
    rows = (N + cols - 1) // cols
    cell_h, cell_w = h + 2 * pad, w + 2 * pad
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), (40, 40, 40))
    for i in range(N):
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w, r * cell_h
        if borders is not None and borders[i] is not None:
            grid.paste(borders[i], (x0, y0, x0 + cell_w, y0 + cell_h))
        tile = Image.fromarray(arr[i][..., :3]).resize((w, h), Image.NEAREST)
        grid.paste(tile, (x0 + pad, y0 + pad))
    return grid


def add_labels(grid: Image.Image, row_labels: list[str], col_labels: list[str], cell: tuple[int, int]) -> Image.Image:
    """Put text labels left of the rows and above the columns of a grid made by `make_grid`."""
    left, top = 8 + 7 * max((len(s) for s in row_labels), default=0), 16
    out = Image.new("RGB", (grid.width + left, grid.height + top), (255, 255, 255))
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    cell_w, cell_h = cell
    for i, s in enumerate(col_labels):
        draw.text((left + i * cell_w + 2, 2), s, fill=(0, 0, 0))
    for i, s in enumerate(row_labels):
        draw.text((2, top + i * cell_h + cell_h // 2 - 5), s, fill=(0, 0, 0))
    return out


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write atomically so a viewer (or a killed run) never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    try:
        image.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no half PNG behind


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8, scale: int = 4, **kw: Any) -> None:
    save_png(make_grid(images, nrow=nrow, scale=scale, **kw), path)
