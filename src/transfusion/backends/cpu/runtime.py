"""Process-level CPU runtime settings ([runtime] threads / tune_malloc), applied once per process by
backends.setup_process (train, sample/caption/generate/eval, demo, bench).

- Intra-op threads.
- glibc malloc. PyTorch frees and re-allocates the same multi-megabyte activation buffers every step. By default
  glibc serves such blocks with mmap (above a threshold it only raises on the way) and hands freed heap tops
  back to the OS, so every step page-faults its buffers in again. Keeping them in the heap (mmap threshold
  32 MB, trim threshold 1 GB) made fp32 training of the benchmark model 1.17× faster on 2 cores (1,557 vs
  1,309 tokens/s, two runs each) at the same peak RSS. Intel's PyTorch CPU guide gets the same effect by
  preloading jemalloc or tcmalloc; this needs no extra library. `[runtime] tune_malloc = false` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed activation buffers in the process heap (glibc only); returns whether the settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1


def set_threads(threads: int) -> None:
    """Intra-op threads (0 -> torch's default). On a busy machine, OpenMP's spin-waiting makes 2 threads far
    slower than 1 (12 s vs 2 s per tiny step measured on a shared 2-core box); OMP_WAIT_POLICY=PASSIVE helps."""
    if threads > 0:
        torch.set_num_threads(threads)

