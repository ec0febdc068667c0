"""Parallelisation of the model for training, applied by the trainer only (torchtitan's shape):

    model = build_model(cfg.model, device="meta")     # model/build.py: a skeleton, no memory
    model = parallelize(model, cfg.train, mesh)       # activation checkpointing -> compile -> fully_shard
    materialize(model, cfg.model, device, seed, sharded=mesh is not None)

FSDP is told to sum gradients across ranks (the trainer's loss is already each rank's share of the global
mean), and the initial weights of a sharded model equal the single-process init (`materialize`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from transfusion.config import ConfigError, ModelConfig, TrainConfig
from transfusion.model.build import build_model, init_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def apply_ac(model: nn.Module) -> None:
    for block in model.layers:
        _checkpoint_block(block)


def apply_compile(model: nn.Module) -> None:
    for block in model.layers:
        block.compile()  # in place: keeps state-dict keys


def apply_fsdp(model: nn.Module, tc: TrainConfig, mesh: Any) -> None:
    """fully_shard per block, then on the root (embeddings, patch encoder/decoder, final norm, LM head)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    blocks = list(model.layers)
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


def parallelize(model: nn.Module, tc: TrainConfig, mesh: Any | None) -> nn.Module:
    """In torchtitan's order: activation checkpointing, torch.compile, FSDP, each as `tc` asks. Runs on the
    meta-device skeleton, before `materialize`; `mesh=None` (one plain process) shards nothing. The trainer
    calls this; inference never does (a loaded model is plain, see checkpoint/export.py)."""
    if tc.activation_checkpointing:
        apply_ac(model)
    if tc.compile:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, tc, mesh)
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
    with warnings.catch_warnings():
        # DTensor warns that its random ops are incomplete on a CPU mesh: irrelevant, rank 0's init replaces them
        warnings.filterwarnings("ignore", message="DTensor random operators")
        init_model(model, seed)
    if not sharded:
        return
    full = build_model(cfg, "cpu", seed).state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
