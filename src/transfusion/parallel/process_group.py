"""The process group: where this process sits in a torchrun job, the device mesh, and scalar all-reduces.

    info = init_distributed(cfg.train.device)          # torchrun env -> process group (gloo on CPU, nccl on GPU)
    check_global_batch(cfg.train, info.world_size)     # clear error before any step
    mesh = build_mesh(info, cfg.train.hsdp_replicate)  # None for one plain process
    ...                                                # parallel/parallelize.py, train/step.py
    destroy_distributed()

A plain process (no WORLD_SIZE in the environment) has world size 1, no process group and no mesh; the same
trainer code runs on it. See docs/distributed.md for the exactness contract the trainer builds on this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from transfusion.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; world_size 1 and no process group for a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True under torchrun (even with one rank): a process group exists and FSDP is applied."""
        return dist.is_available() and dist.is_initialized()


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per local rank
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_ADDR/PORT), or return a
    single-process DistInfo when WORLD_SIZE is absent. Backend follows the device: nccl for CUDA, gloo for CPU."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return DistInfo(device=_resolve_device(device, 0))
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_global_batch(tc: TrainConfig, world_size: int) -> int:
    """Rows per micro-batch on each rank; a ConfigError (before any step) when the global batch cannot be split
    evenly into world_size x grad_accum non-empty micro-batches."""
    per_step = world_size * tc.grad_accum
    if tc.grad_accum < 1 or tc.batch_size < per_step or tc.batch_size % per_step:
        ok = [n for n in range(1, world_size + 1) if tc.batch_size % (n * max(tc.grad_accum, 1)) == 0]
        raise ConfigError(
            f"train.batch_size={tc.batch_size} (global rows per step) cannot be split over world_size={world_size}"
            f" ranks x train.grad_accum={tc.grad_accum} micro-steps: it must be a positive multiple of "
            f"{per_step}. Use a batch size that is a multiple of {per_step}, lower train.grad_accum, or run on "
            f"one of {ok} ranks."
        )
    return tc.batch_size // per_step


def build_mesh(info: DistInfo, replicate: int = 1):
    """1-D ("dp_shard",) mesh for FSDP, or 2-D ("dp_replicate", "dp_shard") for HSDP: parameters are sharded
    within a group (e.g. a node) and replicated across groups. None for a plain single process."""
    if not info.is_distributed:
        if replicate > 1:
            raise ConfigError(f"train.hsdp_replicate={replicate} needs torchrun with a multiple of {replicate} ranks")
        return None
    from torch.distributed.device_mesh import init_device_mesh

    ws = info.world_size
    if replicate <= 1:
        return init_device_mesh(info.device.type, (ws,), mesh_dim_names=("dp_shard",))
    if ws % replicate:
        raise ConfigError(f"train.hsdp_replicate={replicate} does not divide world_size={ws}")
    return init_device_mesh(info.device.type, (replicate, ws // replicate), mesh_dim_names=("dp_replicate", "dp_shard"))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (counts, loss parts); identity for one process. float64 keeps counts exact."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
