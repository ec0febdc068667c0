"""Every environment variable the project reads, in one place. Everything else is in the config ([runtime]).

    TRANSFUSION_CACHE         where trained scorers and tokenized corpora are cached
                              (default: $XDG_CACHE_HOME/transfusion, else ~/.cache/transfusion)
    TRANSFUSION_FASHION_DIR   a folder holding Fashion-MNIST's four IDX .gz files, when they are not where the
                              Debian package `dataset-fashion-mnist` puts them
    TRANSFUSION_DEBUG         set (to anything): the CLI re-raises user errors with their traceback

torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are read by parallel/process_group.py,
and OMP_NUM_THREADS / OMP_WAIT_POLICY by the OpenMP runtime itself.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = "TRANSFUSION_CACHE"
FASHION_DIR = "TRANSFUSION_FASHION_DIR"
DEBUG = "TRANSFUSION_DEBUG"


def cache_dir() -> Path:
    """$TRANSFUSION_CACHE, else $XDG_CACHE_HOME/transfusion, else ~/.cache/transfusion."""
    if os.environ.get(CACHE):
        return Path(os.environ[CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "transfusion"


def fashion_dir_override() -> str | None:
    return os.environ.get(FASHION_DIR) or None


def debug() -> bool:
    return bool(os.environ.get(DEBUG))


def is_rank0() -> bool:
    """Rank 0 of a torchrun job, or a plain process (torchrun sets RANK for every worker)."""
    return os.environ.get("RANK", "0") == "0"
