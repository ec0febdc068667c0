"""One optimiser step, the same code on 1 process or N torchrun ranks:

    micro = split_rows(batch, cfg.train.grad_accum)                     # rows -> grad-accumulation micro-batches
    stats = train_step(model, opt, micro, schedule, cfg, step, first_row, info)

Exactness contract: N ranks x A micro-steps compute the same losses and gradients as one process on the whole
global batch (up to float summation order), because
1. the data loader gives rank r the global rows [r*b, (r+1)*b) of the batch one process would see;
2. the loss of every micro-batch is divided by the *global* numbers of text targets and images (one all_reduce
   of two counts per step), and FSDP is told to sum, not average, gradients across ranks (parallelize.py): the
   per-rank losses then add up to exactly the single-process loss, and so do their gradients;
3. diffusion timesteps and noise are drawn per *global row* from a generator seeded by (seed, step, row), so
   they do not depend on which rank or micro-step holds the row (`noise_for_rows`). Resuming needs no RNG state;
4. initial weights are computed in full on rank 0 and scattered (parallel/parallelize.materialize).

SPMD: FSDP's collectives run inside every module call, so every rank must call every module every step. The
model calls its patch encoder/decoder even on zero patches, and `train_step` runs the same number of
micro-steps on every rank; a rank whose rows hold no image (or no text) still joins every collective.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from transfusion.batch import IGNORE, MixedBatch
from transfusion.config import Config, Family
from transfusion.losses import chameleon_loss, transfusion_loss
from transfusion.parallel.process_group import DistInfo, all_reduce_sum


def split_rows(batch: MixedBatch, n: int) -> list[MixedBatch]:
    """Cut a batch into n micro-batches of consecutive rows. Patches are stored in reading order, so each
    micro-batch's patches are one contiguous slice; its images are renumbered 0..k-1 in the same order."""
    if n == 1:
        return [batch]
    B = batch.tokens.shape[0]
    rows = B // n
    patches_per_row = (batch.image_ids >= 0).sum(dim=1)  # (B,)
    offsets = torch.cat([patches_per_row.new_zeros(1), patches_per_row.cumsum(0)]).tolist()  # (B+1,)
    out = []
    for i in range(n):
        r0, r1 = i * rows, (i + 1) * rows
        ids = batch.image_ids[r0:r1]  # (rows, L)
        present = torch.unique(ids[ids >= 0])  # sorted image indices in this slice
        new_ids = torch.where(ids >= 0, torch.searchsorted(present, ids.clamp(min=0)), ids)
        out.append(
            MixedBatch(
                tokens=batch.tokens[r0:r1],
                image_ids=new_ids,
                doc_ids=batch.doc_ids[r0:r1],
                positions=batch.positions[r0:r1],
                lm_targets=batch.lm_targets[r0:r1],
                patches=batch.patches[offsets[r0] : offsets[r1]],
                image_max_t=batch.image_max_t[present],
            )
        )
    return out


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
    z_loss: float | None = None  # global mean log^2 Z over the LM targets when train.z_loss > 0
    n_targets: int = 0  # global LM targets (logits computed): the FLOP count's LM-head term
    n_encoded: int = 0  # global images through the patch encoder (conditioning ones too): its FLOP term


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[MixedBatch], schedule: Any,
               cfg: Config, step: int, first_row: int, info: DistInfo) -> StepResult:
    """One optimiser step over this rank's micro-batches (consecutive rows starting at global row `first_row`).

    Skips the update (on all ranks alike: the loss and norm are global) when the loss or gradient is not finite.
    """
    tc = cfg.train
    local_text = sum(int((mb.lm_targets != IGNORE).sum()) for mb in micro_batches)
    local_img = sum(int(mb.diffused.sum()) for mb in micro_batches)  # CLEAN conditioning images are no target
    local_enc = sum(mb.num_images for mb in micro_batches)
    n_text, n_img, n_enc = all_reduce_sum([local_text, local_img, local_enc], info.device)
    rows = micro_batches[0].tokens.shape[0]
    chameleon = cfg.model.family == Family.CHAMELEON
    lm_part = diff_part = z_part = 0.0
    for i, mb in enumerate(micro_batches):
        set_gradient_sync(model, i == len(micro_batches) - 1)
        # Chameleon: images are tokens, one next-token loss and no noise to draw
        draw = None if chameleon else noise_for_rows(mb, schedule, tc.seed, step, first_row + i * rows)
        with _autocast(info.device, tc.bf16):
            if chameleon:
                out = chameleon_loss(model, mb, normalizer=(n_text, 0), z_loss_weight=tc.z_loss)
            else:
                out = transfusion_loss(model, mb, schedule, lm_weight=tc.lm_weight,
                                       diffusion_weight=tc.diffusion_weight, normalizer=(n_text, n_img),
                                       noise_draw=draw, z_loss_weight=tc.z_loss)
        out.loss.backward()
        lm_part += float(out.lm_loss)
        diff_part += float(out.diffusion_loss)
        z_part += float(out.z_loss) if out.z_loss is not None else 0.0
    lm, diff, z = all_reduce_sum([lm_part, diff_part, z_part], info.device)
    if chameleon:
        loss = lm
    else:
        loss = tc.lm_weight * lm + tc.diffusion_weight * diff
    if tc.z_loss > 0:
        loss += tc.z_loss * z
    grad_norm = clip_grad_norm(model, tc.grad_clip)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(mb.tokens.numel() for mb in micro_batches) * info.world_size  # every rank has as many rows
    return StepResult(loss, lm, diff, grad_norm, skipped, tokens, int(n_img), z if tc.z_loss > 0 else None,
                      int(n_text), int(n_enc))


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
