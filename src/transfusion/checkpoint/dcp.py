"""The training checkpoint format: torch.distributed.checkpoint (DCP), saved on N ranks, resumed on M.

The trainer's one checkpoint format, for every run (a plain single process writes one shard file), in the
directory scheme of layout.py:

    RUN/checkpoints/step_XXXXXXXX/
        dcp/.metadata, dcp/__R_0.distcp   model, optimiser moments, EMA and RNG tensors; each rank writes its
                                           shards and DCP reshards on load, so the world size may change
        train_state.json                   trainer counters, loader position, optimiser hyper-parameters
        config.toml  tokenizer.json  manifest.json

Only tensors go through DCP. DCP stores any other value as a pickle and reads it back with
torch.load(weights_only=False), i.e. unrestricted unpickling; the JSON file keeps the promise that loading a
checkpoint never runs code from it. Ranks write into a hidden temp directory, rank 0 adds the small files,
seals and publishes it (layout.py).

`load_into_plain` (one process) loads any DCP checkpoint into an unsharded model: export.load_for_inference uses
it, so `transfusion sample --ckpt RUN` reads training checkpoints directly. This module never imports the trainer:
the trainer hands it the objects to save (model, optimiser, EMA) and a JSON-able dict of its own state.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException

from transfusion.checkpoint import layout
from transfusion.checkpoint.layout import CKPT_SUBDIR, DCP_SUBDIR, STATE_JSON, CheckpointError
from transfusion.config import Config

FORMAT = "dcp-1"


@dataclass
class LoadedState:
    path: Path
    step: int
    train_state: dict[str, Any]  # what the trainer passed to `save` (counters, loader position, ...)
    saved_world_size: int
    has_ema: bool


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return not _dist() or dist.get_rank() == 0


def barrier() -> None:
    if _dist():
        dist.barrier()


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every call without a process group ("assuming the intent is to save in a single process");
    one process is a supported, intended mode here, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_dcp_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint written by this module (a run dir, its checkpoints/ dir, or a step dir)."""
    try:
        return (layout.resolve(path) / DCP_SUBDIR / ".metadata").is_file()
    except CheckpointError:
        return False


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: Any | None
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """DCP state (tensors only, keyed by parameter FQN, so independent of sharding) + optimiser param groups."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        groups: list[dict[str, Any]] = []
    else:
        msd, osd = get_state_dict(model, optimizer)  # initialises empty optimiser state so load has a target
        state, groups = {"model": msd, "optim": osd["state"]}, osd["param_groups"]
    if ema is not None:
        state["ema"] = ema.state_dict()  # fp32 DTensor shards under FSDP: DCP reshards them like weights
    state["rng"] = {"torch_cpu": torch.get_rng_state()}  # replicated: rank 0's copy is written
    return state, groups


def _brief(err: BaseException) -> str:
    """One line for an error line. DCP's CheckpointException is a BaseException (`except Exception` let it escape
    as a traceback) whose text is every rank's full traceback: name the first underlying failure instead."""
    inner = [e for e in layout.causes(err) if not isinstance(e, CheckpointException)] or [err]
    text = str(inner[0]).strip().splitlines()
    return f"{type(inner[0]).__name__}: {text[0] if text else ''}"


def _any_rank(flag: bool) -> bool:
    """Collective: True on every rank when `flag` is True on any (identity on one process)."""
    if not _dist():
        return flag
    # gloo reduces CPU tensors; a NCCL-only group needs the rank's current GPU
    gloo = "gloo" in str(dist.get_backend())
    dev = torch.device("cpu") if gloo else torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([int(flag)], device=dev)
    dist.all_reduce(t)
    return bool(t.item())


def _together(fn: Callable[[], Any], run_dir: Path, tmp: Path, name: str) -> Any:
    """Collective: run one phase of a save on every rank; when it failed on any rank, every rank leaves together
    (none is left waiting in the next collective), rank 0 removes the temp directory, and a failed write (a full
    disk) becomes CheckpointWriteError. Doubles as the barrier between phases."""
    err: BaseException | None = None
    result = None
    try:
        result = fn()
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        err = e
    if not _any_rank(err is not None):
        return result
    if is_main():
        layout.discard_temp(tmp)
    if err is None:  # rank 0 prints the error line: it failed too (DCP shares failures) or names the others'
        raise layout.CheckpointWriteError(f"checkpoint {name} was not written: another rank failed to write it")
    os_err = layout.os_error(err)
    if os_err is None:
        raise err  # not a write failure: a bug, keep its traceback
    raise layout.write_failed(os_err, run_dir, name) from err


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
         train_state: dict[str, Any], ema: Any | None = None, tokenizer: Any | None = None, keep: int = 2) -> Path:
    """Collective: every rank calls it. Writes RUN/checkpoints/step_XXXXXXXX atomically; returns its path.

    `train_state` must be JSON-serialisable (counters, loader.state_dict(), ...): it is returned by `load`.
    A write that fails on any rank (a full disk) raises layout.CheckpointWriteError on every rank, with the temp
    directory removed and `latest` and the published checkpoints untouched.
    """
    root = Path(run_dir) / CKPT_SUBDIR
    final = root / layout.step_name(step)
    tmp = root / f".tmp-{final.name}"
    _together(lambda: layout.temp_dir(root, final.name) if is_main() else None, Path(run_dir), tmp, final.name)

    def shards() -> list[dict[str, Any]]:
        state, groups = _tensor_state(model, optimizer, ema)
        with _single_process_ok():
            dcp.save(state, checkpoint_id=str(tmp / DCP_SUBDIR), no_dist=not _dist())
        return groups

    groups = _together(shards, Path(run_dir), tmp, final.name)

    def finish() -> None:
        if not is_main():
            return
        meta = {
            "format": FORMAT, "step": step, "world_size": dist.get_world_size() if _dist() else 1,
            "has_ema": ema is not None, "train_state": train_state, "optim_param_groups": groups,
        }
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
        layout.write_common(tmp, cfg, tokenizer)
        layout.seal(tmp, step, FORMAT)
        layout.publish(tmp, final, keep)

    # the last phase's agreement is also the barrier: no rank runs ahead (e.g. into the next save) before the
    # checkpoint is in place
    _together(finish, Path(run_dir), tmp, final.name)
    return final


def _check_files(ckpt: Path) -> dict[str, Any]:
    """Sizes against the manifest on every rank, then the training state; returns the latter."""
    layout.check_sizes(ckpt)
    try:
        meta = json.loads((ckpt / STATE_JSON).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: {STATE_JSON} is missing; the checkpoint is incomplete") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt}: unreadable JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: not a DCP checkpoint of format {FORMAT} (got {meta.get('format')!r})")
    return meta


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, cfg: Config,
         ema: Any | None = None) -> LoadedState:
    """Collective. Restore model, optimiser (if given), EMA (if given and saved) and RNG from a DCP checkpoint
    saved at any world size. A checkpoint of a different model config is refused before any tensor is read."""
    ckpt = layout.resolve(path)
    if not is_dcp_checkpoint(ckpt):
        raise CheckpointError(
            f"{ckpt} is a single-file (export) checkpoint without optimiser shards; training can only resume "
            "from a training checkpoint (checkpoints/step_*/dcp/)")
    meta = _check_files(ckpt)
    saved = layout.read_config(ckpt)
    layout.check_model_config(saved.model, cfg.model, ckpt)
    has_ema = bool(meta.get("has_ema"))
    state, _ = _tensor_state(model, optimizer, ema if has_ema else None)
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(ckpt / DCP_SUBDIR), no_dist=not _dist())
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures in CheckpointException
        raise CheckpointError(f"{ckpt}: DCP load failed ({_brief(e)})") from None
    _apply(model, optimizer, state, meta["optim_param_groups"])
    torch.set_rng_state(state["rng"]["torch_cpu"])
    return LoadedState(ckpt, int(meta["step"]), meta["train_state"], int(meta["world_size"]), has_ema)


def _apply(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
           groups: list[dict[str, Any]]) -> None:
    # DCP loaded the tensors in place; set_state_dict still runs so FSDP/optimiser bookkeeping sees the values
    # (and plain-module loads go through load_state_dict's checks). EMA shadows were loaded in place.
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, state["model"])
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": groups})


def full_weights(model: nn.Module, ema: Any | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Collective: unsharded CPU copies of the weights (and EMA) on rank 0; empty dicts elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_full = None
    if ema is not None:
        ema_full = {}
        for name, t in ema.state_dict().items():  # one tensor at a time: peak memory is one full tensor
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            if is_main():
                ema_full[name] = t.detach().cpu()
    return full, ema_full


def load_into_plain(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """One process, no process group: load a DCP checkpoint saved at any world size into a plain (unsharded)
    model of its config; returns its fp32 EMA weights, or None when it has none. Used for inference/export."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    ckpt = layout.resolve(path)
    meta = _check_files(ckpt)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if meta.get("has_ema"):
        state["ema"] = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(ckpt / DCP_SUBDIR), no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP wraps read failures in CheckpointException
        raise CheckpointError(f"{ckpt}: DCP load failed ({_brief(e)})") from None
    model.load_state_dict(state["model"])  # strict: every weight must have come from the checkpoint
    return state.get("ema")
