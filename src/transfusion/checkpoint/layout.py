"""The checkpoint layout, written once: names, manifest, atomic publish, resolve, verify.

Layout of a run directory:

    RUN/config.toml                      resolved config of the run
    RUN/checkpoints/step_00000200/       one complete checkpoint, in one of two formats:
        dcp/ + train_state.json          training format (dcp.py): sharded tensors + counters, resumable
        model.safetensors (+ ema.safetensors)   export format (export.py): full weights in one file
        config.toml                      the config that produced it (model shape is checked against it)
        tokenizer.json                   copy of the tokenizer, so the checkpoint is self-contained
        manifest.json                    size + sha256 of every other file; written last
    RUN/checkpoints/latest               name of the newest complete checkpoint

Atomicity: everything is written into a hidden temp directory, each file fsync'd, the manifest written, then
the directory is renamed into place with os.replace (atomic on POSIX), the parent fsync'd, and only then
`latest` is replaced the same way (`publish`). A run killed at any moment leaves either the previous checkpoint
or the new one, never half of one; the manifest catches later damage (truncated copy, bit rot) with a clear
CheckpointError instead of garbage weights. Nothing here unpickles: weights are safetensors or DCP tensors,
everything else JSON or TOML.

A failed write (a full disk: ENOSPC, or a quota: EDQUOT) is the same story told earlier: the temp directory is
removed at once (`discard_temp`; a process killed before that leaves it to the next save's `prune`), `latest`
and every published checkpoint stay as they were, and `write_failed` says so in one CheckpointWriteError line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transfusion import config as config_mod
from transfusion.config import Config, ConfigError, ModelConfig

CKPT_SUBDIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.toml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
DCP_SUBDIR = "dcp"  # training format (dcp.py)
STATE_JSON = "train_state.json"  # training format: counters, loader position, optimiser hyper-parameters


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or from an incompatible model config."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, quota, read-only file system); nothing saved before is lost."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def temp_dir(root: Path, name: str) -> Path:
    """A fresh hidden directory under `root` to write checkpoint `name` into (same name on every rank)."""
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_common(tmp: Path, cfg: Config, tokenizer: Any | None) -> None:
    """The files every checkpoint carries besides its tensors: the config and a copy of the tokenizer."""
    (tmp / CONFIG_FILE).write_text(config_mod.dump_toml(cfg))
    if tokenizer is not None:  # anything with .save(path), i.e. transfusion.tokenizer.Tokenizer
        tokenizer.save(tmp / TOKENIZER_FILE)


def seal(tmp: Path, step: int, fmt: str) -> None:
    """fsync every file, then write the manifest (size + sha256 of each, paths relative to `tmp`) last."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    for p in files:
        fsync_file(p)
    manifest = {
        "format": fmt,
        "step": step,
        "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    fsync_file(tmp / MANIFEST_FILE)
    fsync_dir(tmp)


def publish(tmp: Path, final: Path, keep: int) -> Path:
    """Rename a sealed temp directory into place, point `latest` at it, keep the newest `keep` (0: all)."""
    root = final.parent
    if final.exists():  # re-saving a step (e.g. a resumed run's final save): move the old one out of the way
        old = root / f".old-{final.name}-{os.getpid()}"
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


def discard_temp(tmp: Path) -> None:
    """Remove an unpublished checkpoint (and a half-written `latest` pointer) after a failed save: on a full
    disk, the space it holds is what the user needs back first."""
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp.parent / f".{LATEST}.tmp").unlink(missing_ok=True)


def causes(err: BaseException) -> list[BaseException]:
    """`err`, its causes, and what DCP wrapped (CheckpointException.failures: rank -> (exception, trace))."""
    out: list[BaseException] = []
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return out


def os_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write (a full disk first), or None when the failure is something else."""
    found = [e if isinstance(e, OSError) else _rust_os_error(e) for e in causes(err)]
    found = [e for e in found if e is not None]
    full = [e for e in found if e.errno in DISK_FULL]
    return (full or found or [None])[0]


def _rust_os_error(err: BaseException) -> OSError | None:
    # safetensors (Rust) reports a full disk as SafetensorError("... No space left on device (os error 28)")
    # (measured on a 256 KiB tmpfs), not as an OSError: recover the errno from Rust's io::Error text
    m = re.search(r"\(os error (\d+)\)", str(err))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def failure_text(err: OSError) -> str:
    """What went wrong with a write, for an error line: a full disk said plainly, else the OS's reason."""
    if err.errno in DISK_FULL:
        return "the disk is full (no space left on device)"
    return f"cannot write ({err.strerror or err}{f': {err.filename}' if err.filename else ''})"


def write_failed(err: OSError, run_dir: Path, name: str, then: str = "continue with --resume"
                 ) -> CheckpointWriteError:
    """The one-line error for a checkpoint `name` of `run_dir` that could not be written (the temp directory
    already discarded): what happened, and which checkpoint `latest` still names, complete and untouched."""
    what = f"{failure_text(err)} while writing checkpoint {name} in {Path(run_dir) / CKPT_SUBDIR}"
    kept = find_latest(run_dir)
    saved = f"{kept} is complete and `latest` points to it" if kept else "no checkpoint had been saved before"
    return CheckpointWriteError(f"{what}; the partial checkpoint was removed and nothing already saved is lost: "
                                f"{saved}. Free some space, then {then}")


def abandon_write(tmp: Path, err: BaseException, run_dir: Path, name: str, then: str = "continue with --resume"
                  ) -> None:
    """After a save into `tmp` failed with `err`: discard the temp directory, then raise the one-line
    CheckpointWriteError when a write failed (a full disk); return otherwise, for the caller to re-raise."""
    discard_temp(tmp)
    os_err = os_error(err)
    if os_err is not None:
        raise write_failed(os_err, Path(run_dir), name, then) from err


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers of killed saves."""
    for p in root.glob(".tmp-*"):  # leftovers of killed saves (the current save was published already)
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
    if (path / MANIFEST_FILE).is_file() or (path / MODEL_FILE).is_file() or (path / DCP_SUBDIR).is_dir():
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


def check_sizes(ckpt: Path) -> dict[str, Any]:
    """Cheap completeness check (sizes against the manifest; sha256 is `verify`'s job, too slow to run on every
    rank for large models). Every rank reads the same files, so all raise alike. Returns the manifest."""
    try:
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {MANIFEST_FILE}; the checkpoint is incomplete (was the save killed?)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: unreadable {MANIFEST_FILE} ({e})") from None
    for name, meta in files.items():
        p = ckpt / name
        if not p.is_file() or p.stat().st_size != meta["size"]:
            raise CheckpointError(f"{ckpt}: {name} is missing or truncated")
    return manifest


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
        return config_mod.load(ckpt / CONFIG_FILE, saved=True)
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


