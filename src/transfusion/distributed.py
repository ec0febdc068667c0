"""Data-parallel training on PyTorch's own engine: torchrun, DeviceMesh, FSDP2 (`fully_shard`).

    info  = init_distributed(cfg.train.device)        # torchrun env -> process group (gloo on CPU, nccl on GPU)
    check_global_batch(cfg.train, info.world_size)    # clear error before any step
    mesh  = build_mesh(info, cfg.train.hsdp_replicate)  # None for one plain process
    model = build_model(cfg, info, mesh)              # meta -> parallelize -> to_empty -> init_weights
    stats = train_step(model, opt, micro_batches, schedule, cfg, step, first_row, info)

Exactness contract: N ranks x A micro-steps compute the same losses and gradients as one process on the whole
global batch (up to float summation order), because
1. the data loader gives rank r the global rows [r*b, (r+1)*b) of the batch one process would see;
2. the loss of every micro-batch is divided by the *global* numbers of text targets and images (one all_reduce
   of two counts per step), and FSDP is told to sum, not average, gradients across ranks: the per-rank losses
   then add up to exactly the single-process loss, and so do their gradients;
3. diffusion timesteps and noise are drawn per *global row* from a generator seeded by (seed, step, row), so
   they do not depend on which rank or micro-step holds the row (`noise_for_rows`). Resuming needs no RNG state;
4. initial weights are computed in full on rank 0 and scattered (`materialize`), identical to one process.

SPMD: FSDP's collectives run inside every module call, so every rank must call every module every step. The
model calls its patch encoder/decoder even on zero patches, and `train_step` runs the same number of
micro-steps on every rank; a rank whose rows hold no image (or no text) still joins every collective.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from transfusion.batch import IGNORE, MixedBatch
from transfusion.config import Config, ConfigError, ModelConfig, TrainConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


# ------------------------------------------------------------------------------------------ model


def _checkpoint_block(block: nn.Module) -> None:
    """Recompute the block's activations in backward instead of storing them. Done by wrapping the instance's
    forward (not by a wrapper module) so parameter names, and therefore checkpoints, stay unchanged."""
    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # sampling / eval: nothing to save memory on
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward  # type: ignore[method-assign]


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"{key}={name!r}: expected one of {list(_DTYPES)}")
    return _DTYPES[name]


def parallelize(model: nn.Module, tc: TrainConfig, mesh: Any | None) -> nn.Module:
    """In torchtitan's order: activation checkpointing per block, torch.compile per block, fully_shard per block,
    fully_shard on the root (embeddings, patch encoder/decoder, final norm, LM head). Runs on the meta-device
    model, before `to_empty`; `mesh=None` (one plain process) applies only the first two."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    blocks = list(model.layers)
    if tc.activation_checkpointing:
        for block in blocks:
            _checkpoint_block(block)
    if tc.compile:
        for block in blocks:
            block.compile()  # in place: keeps state-dict keys
    if mesh is None:
        return model
    mp = MixedPrecisionPolicy(
        param_dtype=_dtype(tc.mixed_precision_param, "train.mixed_precision_param"),
        reduce_dtype=_dtype(tc.mixed_precision_reduce, "train.mixed_precision_reduce"),
    )
    for i, block in enumerate(blocks):
        # backward needs the last block's weights right after forward: resharding them would only re-gather
        reshard = tc.fsdp_reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=tc.fsdp_reshard_after_forward)
    # Each rank's loss is already its share of the *global* mean (global-count normaliser), so the gradients
    # of the ranks must be summed; FSDP's default would average them (divide by the data-parallel size).
    # Plain SUM collectives (factor 1 would otherwise become PREMUL_SUM, which gloo lacks; NCCL is fine either way).
    for m in model.modules():
        if isinstance(m, FSDPModule):
            setter = getattr(m, "set_gradient_divide_factor", None) or m.set_reduce_scatter_divide_factor
            setter(1.0)
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)
    return model


def reference_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """The single-process model a run starts from: meta build, `to_empty`, `init_weights` under `seed`."""
    from transfusion.model.transfusion import Transfusion

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transfusion(cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model


def materialize(model: nn.Module, cfg: ModelConfig, device: torch.device, seed: int, sharded: bool) -> None:
    """Allocate the (sharded) meta-device model on `device` and initialise every parameter and buffer.

    `init_weights()` runs on every rank: it fills the non-persistent buffers (RoPE tables), which no state dict
    carries. For sharded weights that is not enough: random init of a sharded DTensor draws each shard from the
    rank's own RNG, which on CPU gives every rank the *same* numbers (a full weight made of repeated blocks) and
    in no case equals the single-process init. So rank 0 computes the full single-process init on the CPU and
    FSDP scatters it (one full model in rank 0's host memory: 28 GB for 7B in fp32, fine on a training node).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad(), warnings.catch_warnings():
        # DTensor warns that its random ops are incomplete on a CPU mesh: irrelevant, rank 0's init replaces them
        warnings.filterwarnings("ignore", message="DTensor random operators")
        model.init_weights()
    if not sharded:
        return
    full = reference_model(cfg, seed).state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    torch.manual_seed(seed)  # every rank leaves with the same global RNG state


def build_model(cfg: Config, info: DistInfo, mesh: Any | None) -> nn.Module:
    """Meta-device build -> parallelize -> materialise: the one construction path for 1 process and N ranks."""
    from transfusion.model.transfusion import Transfusion

    with torch.device("meta"):
        model = Transfusion(cfg.model)
    model = parallelize(model, cfg.train, mesh)
    materialize(model, cfg.model, info.device, cfg.train.seed, sharded=mesh is not None)
    return model


# ------------------------------------------------------------------------------------------ one step


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (counts, loss parts); identity for one process. float64 keeps counts exact."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _row_seed(seed: int, step: int, row: int) -> int:
    # SeedSequence mixes the three numbers well, so neighbouring rows/steps get unrelated streams
    return int(np.random.SeedSequence([seed, step, row]).generate_state(1, np.uint64)[0] >> 1)


def noise_for_rows(batch: MixedBatch, schedule: Any, seed: int, step: int, first_row: int) -> tuple[Tensor, Tensor]:
    """(t per image (N,), noise (P, D)) for a micro-batch whose row j is global row `first_row + j` of step `step`.

    Each row draws its images' timesteps, then its patches' noise, from its own generator seeded by
    (seed, step, global row): the draw is the same whichever rank or micro-step holds the row, which makes
    N ranks x A micro-steps exactly equal to one process, and makes resuming independent of RNG state.
    """
    dev = batch.patches.device
    is_img = batch.image_ids >= 0  # (B, L)
    offsets = torch.cat([is_img.new_zeros(1, dtype=torch.long), is_img.sum(1).cumsum(0)]).tolist()  # (B+1,)
    t_img = torch.zeros(batch.num_images, dtype=torch.long, device=dev)
    noise = torch.empty(batch.patches.shape, dtype=torch.float32, device=dev)
    g = torch.Generator(device=dev)
    for j in range(batch.tokens.shape[0]):
        if offsets[j + 1] == offsets[j]:
            continue  # text-only row: nothing to draw
        g.manual_seed(_row_seed(seed, step, first_row + j))
        ids = torch.unique(batch.image_ids[j][is_img[j]])  # this row's images, ascending = reading order
        t_img[ids] = schedule.sample_timesteps(batch.image_max_t[ids], g)
        noise[offsets[j]:offsets[j + 1]] = torch.randn(
            (offsets[j + 1] - offsets[j], noise.shape[1]), generator=g, device=dev
        )
    return t_img, noise


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: skip the gradient reduce-scatter on non-final micro-steps (grads accumulate unsharded locally)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global gradient norm (clipping to max_norm if > 0). With FSDP the grads are DTensor shards and the norm
    comes back as a DTensor; `full_tensor()` reduces it to the true global norm, equal to one process's."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


@dataclass
class StepResult:
    """Global (all-rank) values of one optimiser step, identical on every rank."""

    loss: float
    lm_loss: float
    diffusion_loss: float
    grad_norm: float
    skipped: bool
    tokens: int  # global tokens this step
    n_images: int  # global images this step


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[MixedBatch], schedule: Any,
               cfg: Config, step: int, first_row: int, info: DistInfo) -> StepResult:
    """One optimiser step over this rank's micro-batches (consecutive rows starting at global row `first_row`).

    Skips the update (on all ranks alike: the loss and norm are global) when the loss or gradient is not finite.
    """
    from transfusion.losses import transfusion_loss

    tc = cfg.train
    local_text = sum(int((mb.lm_targets != IGNORE).sum()) for mb in micro_batches)
    local_img = sum(mb.num_images for mb in micro_batches)
    n_text, n_img = all_reduce_sum([local_text, local_img], info.device)
    rows = micro_batches[0].tokens.shape[0]
    lm_part = diff_part = 0.0
    for i, mb in enumerate(micro_batches):
        set_gradient_sync(model, i == len(micro_batches) - 1)
        draw = noise_for_rows(mb, schedule, tc.seed, step, first_row + i * rows)
        with _autocast(info.device, tc.bf16):
            out = transfusion_loss(model, mb, schedule, lm_weight=tc.lm_weight, diffusion_weight=tc.diffusion_weight,
                                   normalizer=(n_text, n_img), noise_draw=draw)
        out.loss.backward()
        lm_part += float(out.lm_loss)
        diff_part += float(out.diffusion_loss)
    lm, diff = all_reduce_sum([lm_part, diff_part], info.device)
    loss = tc.lm_weight * lm + tc.diffusion_weight * diff
    grad_norm = clip_grad_norm(model, tc.grad_clip)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(mb.tokens.numel() for mb in micro_batches) * info.world_size  # every rank has as many rows
    return StepResult(loss, lm, diff, grad_norm, skipped, tokens, int(n_img))


def _autocast(device: torch.device, enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
