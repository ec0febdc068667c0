"""Atomic, verifiable checkpoints that never need unrestricted unpickling.

Layout of a run directory:

    RUN/config.toml                      resolved config of the run
    RUN/checkpoints/step_00000200/       one complete checkpoint
        model.safetensors                training weights
        ema.safetensors                  fp32 EMA weights (when train.ema > 0)
        train_state.pt                   optimiser, loader position, RNG streams, counters: tensors and
                                         primitive containers only, read back with torch.load(weights_only=True)
        config.toml                      the config that produced it (model shape is checked against it)
        tokenizer.json                   copy of the tokenizer, so the checkpoint is self-contained
        manifest.json                    size + sha256 of every file above; written last
    RUN/checkpoints/latest               name of the newest complete checkpoint

Atomicity: everything is written into a hidden temp directory, each file fsync'd, then the directory is renamed
into place with os.replace (atomic on POSIX), the parent fsync'd, and only then `latest` is replaced the same
way. A run killed at any moment leaves either the previous checkpoint or the new one, never half of one; the
manifest catches later damage (truncated copy, bit rot) with a clear CheckpointError instead of garbage weights.

The trainer writes sharded DCP checkpoints (dcp_checkpoint.py), which reuse this directory scheme, the
manifest and `resolve`/`verify`/`find_latest`; this module's own format is the single-file export for
sampling and evaluation (`transfusion export`). `load_for_inference` reads both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from transfusion import config as config_mod
from transfusion.config import Config, ConfigError, ModelConfig

CKPT_SUBDIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.toml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or from an incompatible model config."""


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    train_state: dict[str, Any]
    config: Config


# ------------------------------------------------------------------------------------------------ writing


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    cfg: Config,
    train_state: dict[str, Any] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
    tokenizer: Any | None = None,
    keep: int = 2,
) -> Path:
    """Write RUN/checkpoints/step_XXXXXXXX atomically, point `latest` at it, keep the newest `keep`."""
    root = Path(run_dir) / CKPT_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_model(model, str(tmp / MODEL_FILE))  # handles tied (shared) tensors
    if ema_state is not None:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / EMA_FILE))
    torch.save({"format": FORMAT_VERSION, "step": step, **(train_state or {})}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_mod.dump_toml(cfg))
    if tokenizer is not None:  # anything with .save(path), i.e. transfusion.tokenizer.Tokenizer
        tokenizer.save(tmp / TOKENIZER_FILE)

    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for p in files:
        fsync_file(p)
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "files": {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    fsync_file(tmp / MANIFEST_FILE)
    fsync_dir(tmp)

    if final.exists():  # re-saving a step (e.g. a resumed run's final save): move the old one out of the way
        old = root / f".old-{step_name(step)}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    fsync_dir(root)
    write_latest(root, final.name)
    prune(root, keep)
    return final


def write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers of killed saves."""
    for p in root.glob(".tmp-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
    if keep <= 0:
        return
    for p in _complete_checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete step directories, oldest first (a directory without its manifest is ignored)."""
    dirs = [p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST_FILE).is_file()]
    return sorted(dirs, key=lambda p: p.name)


# ------------------------------------------------------------------------------------------------ reading


def resolve(path: str | Path) -> Path:
    """A run directory, its checkpoints/ directory, or one step directory -> the step directory to load."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / MANIFEST_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    root = path / CKPT_SUBDIR if (path / CKPT_SUBDIR).is_dir() else path
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if (root / name).is_dir():
            return root / name
    found = _complete_checkpoints(root)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path} (expected {CKPT_SUBDIR}/step_*/ with {MANIFEST_FILE})")
    return found[-1]


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint `--resume` should continue from, or None when the run has none yet."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return None
    try:
        return resolve(root)
    except CheckpointError:
        return None


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file against the manifest; raise CheckpointError naming the first problem."""
    mpath = ckpt / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST_FILE}; the checkpoint is incomplete (was the save killed?)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: unreadable {MANIFEST_FILE} ({e})") from None
    for name, meta in files.items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: {name} listed in the manifest is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{ckpt}: {name} is {size} bytes, expected {meta['size']} (truncated or corrupt)")
        if sha256_file(p) != meta["sha256"]:
            raise CheckpointError(f"{ckpt}: {name} fails its checksum (corrupt)")
    return manifest


def read_config(ckpt: Path) -> Config:
    try:
        return config_mod.load(ckpt / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}: cannot read its {CONFIG_FILE}: {e}") from None


def check_model_config(saved: ModelConfig, current: ModelConfig, where: Path) -> None:
    """Raise CheckpointError listing the model fields that differ (a checkpoint fits only its own shape)."""
    a, b = config_mod.to_dict(saved), config_mod.to_dict(current)
    diffs = [f"model.{k}: checkpoint {a[k]!r} vs config {b.get(k)!r}" for k in a if a[k] != b.get(k)]
    if diffs:
        raise CheckpointError(
            f"{where} was trained with a different model config; differences:\n  " + "\n  ".join(diffs)
        )


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load weights ({e})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_ema_state(ckpt: Path) -> dict[str, torch.Tensor] | None:
    p = ckpt / EMA_FILE
    if not p.is_file():
        return None
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot load EMA weights ({e})") from None


def load_train_state(ckpt: Path) -> dict[str, Any]:
    try:
        # weights_only=True: tensors and primitive containers only, so a crafted file cannot run code
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: {STATE_FILE} is missing; this checkpoint cannot resume training") from None
    except Exception as e:  # torch raises several types for corrupt/unsafe pickles
        raise CheckpointError(f"{ckpt}/{STATE_FILE}: unreadable ({type(e).__name__}: {e})") from None


def load_checkpoint(path: str | Path, model: nn.Module, cfg: Config, check: bool = True) -> LoadedCheckpoint:
    """Verify, check the model config, load the training weights into `model`; return the rest for the caller
    (optimiser, loader, RNG, EMA are restored by the trainer, which owns those objects)."""
    ckpt = resolve(path)
    if check:
        verify(ckpt)
    saved = read_config(ckpt)
    check_model_config(saved.model, cfg.model, ckpt)
    _load_weights(model, ckpt / MODEL_FILE)
    state = load_train_state(ckpt)
    return LoadedCheckpoint(path=ckpt, step=int(state.get("step", 0)), train_state=state, config=saved)


def load_for_inference(
    path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu", check: bool = True
) -> tuple[nn.Module, Config, Path]:
    """(model in eval mode, its config, checkpoint dir) — EMA weights when present and `use_ema`.

    Reads both kinds of checkpoint: a training checkpoint (DCP shards written at any world size, see
    dcp_checkpoint.py) and a single-file export (model.safetensors, `transfusion export`).
    The tokenizer is at `ckpt / TOKENIZER_FILE` when the checkpoint carries one (see `tokenizer_path_for`)."""
    from transfusion import dcp_checkpoint  # lazy: both import this module
    from transfusion.train import build_model

    ckpt = resolve(path)
    if check:
        verify(ckpt)
    cfg = read_config(ckpt)
    model = build_model(cfg, device=device)
    if dcp_checkpoint.is_dcp_checkpoint(ckpt):
        ema = dcp_checkpoint.load_into_plain(ckpt, model)
    else:
        _load_weights(model, ckpt / MODEL_FILE)
        ema = load_ema_state(ckpt) if use_ema else None
    if ema is not None and use_ema:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in ema.items():
                if name not in params or params[name].shape != value.shape:
                    raise CheckpointError(f"{ckpt}: EMA weight {name} does not match the model")
                params[name].copy_(value)
    model.eval()
    return model, cfg, ckpt


def tokenizer_path_for(ckpt: Path, cfg: Config) -> str | None:
    """The checkpoint's own tokenizer copy, else the config's, else None (-> the shipped tokenizer)."""
    if (ckpt / TOKENIZER_FILE).is_file():
        return str(ckpt / TOKENIZER_FILE)
    return cfg.data.tokenizer or None
