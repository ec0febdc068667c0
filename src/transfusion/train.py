"""The training loop: `train(cfg, out_dir, resume)`, the same code on 1 process or N torchrun ranks.

    distributed.init_distributed / build_mesh / build_model   process group (if torchrun), FSDP2 model
    distributed.train_step   grad-accumulated forward/backward, global loss, clipping, NaN/Inf skip, step
    split_rows               one MixedBatch -> grad_accum micro-batches (rows, their patches and images)
    _save / _restore         DCP checkpoints (dcp_checkpoint.py), resumable at any world size

Exact resume: the data order is the loader's step, the diffusion noise and timesteps are drawn per global row
from (seed, step, row) (distributed.noise_for_rows), and the weights, AdamW moments and EMA are checkpointed;
nothing else is random. The periodic sample grid uses its own generator, so sampling never perturbs training.
Rank 0 alone writes metrics.jsonl, config.toml and PNGs; every rank joins the collectives (steps, saves,
sampling) in the same order.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from transfusion import checkpoint as ckpt_mod
from transfusion import config as config_mod
from transfusion import dcp_checkpoint as dcpc
from transfusion import distributed as dist_mod
from transfusion.batch import MixedBatch
from transfusion.config import Config, ConfigError
from transfusion.distributed import DistInfo, StepResult
from transfusion.ema import EMA
from transfusion.metrics import MetricsLogger, plot_loss_curve, save_image_grid
from transfusion.model.onednn import onednn_linears
from transfusion.optim import build_optimizer, lr_at, set_lr
from transfusion.runtime import setup_cpu_runtime


class StopAtStepBoundary:
    """First Ctrl-C: finish the current step, then stop and checkpoint (a checkpoint taken mid-step would hold
    updated weights with the old step count and break exact resume). Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopAtStepBoundary":
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses/gradients: the run stops rather than burn compute."""


@dataclass
class TrainState:
    """Counters that travel with a checkpoint (train_state.json)."""

    step: int = 0  # optimiser steps attempted (skipped ones included: their data is consumed)
    skipped_steps: int = 0  # total steps skipped for a non-finite loss or gradient
    bad_in_row: int = 0
    tokens_seen: int = 0


# ------------------------------------------------------------------------------------------ construction


def build_model(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """A plain single-process model (for inference and tests): distributed.build_model without a mesh."""
    return dist_mod.build_model(cfg, DistInfo(device=torch.device(device)), None)


def _check_config(cfg: Config, world_size: int) -> None:
    """Errors a user can fix, raised before any step (every rank raises the same one, so none is left waiting
    in a collective)."""
    dist_mod.check_global_batch(cfg.train, world_size)
    if cfg.train.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {cfg.train.steps}")


# ------------------------------------------------------------------------------------------ micro-batches


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


# ------------------------------------------------------------------------------------------ checkpoints


def _save(run: "Run") -> Path:
    """Collective: every rank writes its shards (DCP); rank 0 adds train_state.json, config, tokenizer."""
    train_state = {"trainer": asdict(run.state), "loader": run.loader.state_dict()}
    return dcpc.save(run.out, run.state.step, run.model, run.optimizer, run.cfg, train_state, ema=run.ema,
                     tokenizer=run.tokenizer, keep=run.cfg.train.keep_checkpoints)


def _restore(path: Path, run: "Run") -> TrainState:
    """Collective: weights, AdamW moments, EMA, RNG, data position and counters from a checkpoint saved at any
    world size. Optimiser hyper-parameters stay this run's (a resumed run may change them)."""
    if not dcpc.is_dcp_checkpoint(path):
        raise ckpt_mod.CheckpointError(
            f"{path} is a single-file (export) checkpoint without optimiser shards; training can only resume "
            "from a training checkpoint (checkpoints/step_*/dcp/)")
    hparams = [{k: g[k] for k in ("weight_decay", "betas", "eps")} for g in run.optimizer.param_groups]
    loaded = dcpc.load(path, run.model, run.optimizer, run.cfg, ema=run.ema)
    for group, h in zip(run.optimizer.param_groups, hparams):
        group.update(h)
    try:
        run.loader.load_state_dict(loaded.train_state["loader"])
        state = TrainState(**loaded.train_state["trainer"])
    except (KeyError, ValueError, TypeError) as e:
        raise ckpt_mod.CheckpointError(f"{loaded.path}: training state does not fit this run ({e})") from None
    if run.ema is not None and not loaded.has_ema:  # EMA switched on mid-run: start it from the loaded weights
        if run.info.is_main:
            print(f"note: {loaded.path} has no EMA; starting the EMA from the loaded weights", file=sys.stderr)
        run.ema.__init__(run.model, run.ema.decay)
    return state


# ------------------------------------------------------------------------------------------ samples


def sample_prompts(cfg: Config, n: int) -> list[str]:
    """Prompts for the periodic grid: for colour fashion, item i in colour i mod 8 (covers items and colours)."""
    if cfg.data.dataset != "colour_fashion":
        return []
    from transfusion.data.fashion import COLOUR_NAMES, ITEMS, caption

    return [caption(i % len(ITEMS), (i * 3) % len(COLOUR_NAMES)) for i in range(n)]


@torch.no_grad()
def write_samples(model: nn.Module, ema: EMA | None, tokenizer: Any, cfg: Config, path: Path | None) -> None:
    """Sample a small grid with the EMA weights (if any) and a fixed seed, restoring the training weights.

    Under FSDP every rank must run this (the forward passes all-gather the weights) with the same prompts and
    seed, so every rank makes the same decisions; only the caller with a `path` (rank 0) writes the PNG."""
    from transfusion.diffusion.schedule import NoiseSchedule
    from transfusion.generate import generate_images

    prompts = sample_prompts(cfg, cfg.train.sample_n)
    if not prompts:
        return
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.train.seed + 12345)
    ctx = ema.swapped_into(model) if ema is not None else contextlib.nullcontext(model)
    was_training = model.training
    with ctx:
        model.eval()
        images = generate_images(
            model, tokenizer, prompts, schedule, steps=cfg.eval.sample_steps, cfg_scale=cfg.eval.cfg_scale,
            sampler=cfg.eval.sampler.value, generator=g, progress=False,
        )
    model.train(was_training)
    if path is not None:
        save_image_grid(images.float().cpu(), path, nrow=min(8, len(prompts)))


# ------------------------------------------------------------------------------------------ the loop


def _prepare_out(out: Path, resume: bool, info: DistInfo) -> Path | None:
    """The checkpoint to resume from (None: fresh run). Refuses to silently overwrite an existing run.
    Every rank decides alike: no rank can write a checkpoint before all have passed here (model init is a
    collective)."""
    latest = ckpt_mod.find_latest(out)
    if latest is not None and not resume:
        raise ConfigError(f"{out} already holds a run ({latest.name}); pass --resume to continue it or pick another --out")
    if resume and latest is None and info.is_main:
        print(f"note: --resume but no checkpoint in {out}; starting from scratch", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    return latest if resume else None


@dataclass
class Run:
    """Everything one training run holds, so the loop below reads as the recipe and each concern is a method."""

    cfg: Config
    out: Path
    info: DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    loader: Any
    schedule: Any
    tokenizer: Any
    state: TrainState
    last_saved: int = -1

    def save(self) -> None:
        _save(self)
        self.last_saved = self.state.step

    def visuals(self) -> None:
        """Collective when sampling (every rank samples); rank 0 writes the files."""
        main = self.info.is_main
        if main:
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        if self.cfg.train.sample_n > 0:
            path = self.out / "samples" / f"step_{self.state.step:08d}.png" if main else None
            write_samples(self.model, self.ema, self.tokenizer, self.cfg, path)


def setup_run(cfg: Config, out: Path, resume: bool, info: DistInfo) -> Run:
    """Tokenizer, model, optimiser, EMA, loader — restored from the latest checkpoint on resume."""
    from transfusion.data.loader import build_loader
    from transfusion.diffusion.schedule import NoiseSchedule
    from transfusion.tokenizer import Tokenizer

    resume_from = _prepare_out(out, resume, info)
    tokenizer = Tokenizer.load(cfg.data.tokenizer or None)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    mesh = dist_mod.build_mesh(info, cfg.train.hsdp_replicate)
    model = dist_mod.build_model(cfg, info, mesh)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    ema = EMA(model, cfg.train.ema) if cfg.train.ema > 0 else None
    loader = build_loader(cfg, tokenizer, "train", rank=info.rank, world_size=info.world_size)
    run = Run(cfg, out, info, model, optimizer, ema, loader, NoiseSchedule.from_config(cfg.diffusion),
              tokenizer, TrainState())
    if resume_from is not None:
        run.state = _restore(resume_from, run)
        run.last_saved = run.state.step
    if info.is_main:
        (out / "config.toml").write_text(config_mod.dump_toml(cfg))
    return run


def train(cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train `cfg` into `out_dir` (checkpoints, metrics.jsonl, PNGs); returns a summary dict.
    Under torchrun every rank calls this; the process group lives exactly as long as the call."""
    setup_cpu_runtime(cfg.train.threads)
    info = dist_mod.init_distributed(cfg.train.device)
    try:
        _check_config(cfg, info.world_size)
        run = setup_run(cfg, Path(out_dir), resume, info)
        return _loop(run, progress and info.is_main)
    finally:
        dist_mod.destroy_distributed()


def _loop(run: Run, progress: bool) -> dict[str, Any]:
    state, cfg, tc, info = run.state, run.cfg, run.cfg.train, run.info
    logger = None
    if info.is_main:
        logger = MetricsLogger(run.out / "metrics.jsonl", resume_step=state.step if run.last_saved >= 0 else None)
    bar = tqdm(total=tc.steps, initial=state.step, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    batches = iter(run.loader)
    rows = tc.batch_size // info.world_size  # this rank's rows: global rows [rank*rows, (rank+1)*rows)
    t_start = t_window = time.perf_counter()
    tok_window, stats = 0, None
    with StopAtStepBoundary() as stop:
        while state.step < tc.steps:
            lr = lr_at(state.step, tc)
            set_lr(run.optimizer, lr)
            batch = next(batches).to(info.device)
            # CPU fp32: Linears through oneDNN (model/onednn.py; off under compile, FSDP, CUDA, bf16 autocast)
            with onednn_linears(run.model, pack=False, enabled=False if tc.compile else None):
                stats = dist_mod.train_step(run.model, run.optimizer, split_rows(batch, tc.grad_accum),
                                            run.schedule, cfg, state.step, info.rank * rows, info)
            state.step += 1
            state.tokens_seen += stats.tokens
            tok_window += stats.tokens
            _count_bad(state, stats, tc.max_bad_steps, info.is_main)
            if not stats.skipped and run.ema is not None:
                run.ema.update(run.model)
            if state.step % tc.log_every == 0 or state.step == tc.steps or stats.skipped:
                tok_s = tok_window / max(1e-9, time.perf_counter() - t_window)
                if logger is not None:
                    logger.log(_log_record(state, stats, lr, tok_s))
                bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                tok_window, t_window = 0, time.perf_counter()
            bar.update(1)
            if tc.sample_every and state.step % tc.sample_every == 0 and state.step < tc.steps:
                run.visuals()
            if tc.ckpt_every and state.step % tc.ckpt_every == 0:
                run.save()
            if _should_stop(stop, tc, state, t_start, info):
                break
    bar.close()
    if run.last_saved != state.step:
        run.save()
    if not stop.requested:  # an interrupted user wants their prompt back, not a sample grid
        run.visuals()
    return _summary(run, stats, time.perf_counter() - t_start)


def _log_record(state: TrainState, stats: StepResult, lr: float, tok_s: float) -> dict[str, Any]:
    return {
        "step": state.step, "loss": stats.loss, "lm_loss": stats.lm_loss, "diffusion_loss": stats.diffusion_loss,
        "lr": lr, "grad_norm": stats.grad_norm, "tokens_per_s": round(tok_s, 1), "n_images": stats.n_images,
        "skipped": stats.skipped, "skipped_steps": state.skipped_steps, "tokens_seen": state.tokens_seen,
    }


def _should_stop(stop: StopAtStepBoundary, tc: Any, state: TrainState, t_start: float, info: DistInfo) -> bool:
    """Ctrl-C or the time budget. Ranks see the signal and the clock at different moments, so they vote (one
    all_reduce per step; identity on one process): all stop at the same step or none does."""
    over_time = bool(tc.time_limit_min) and time.perf_counter() - t_start > 60 * tc.time_limit_min
    interrupted, over_time = (v > 0 for v in dist_mod.all_reduce_sum([stop.requested, over_time], info.device))
    stop.requested = stop.requested or interrupted
    if interrupted:
        if info.is_main:
            print(f"\ninterrupted at step {state.step}; saving a checkpoint (continue with --resume)", file=sys.stderr)
        return True
    if over_time:
        # a wall-clock budget (the demo's): stop cleanly with a checkpoint; --resume continues the schedule
        if info.is_main:
            print(f"\nnote: train.time_limit_min={tc.time_limit_min} reached at step {state.step}/{tc.steps}",
                  file=sys.stderr)
        return True
    return False


def _count_bad(state: TrainState, stats: StepResult, max_bad: int, verbose: bool) -> None:
    """stats are global (identical on every rank), so every rank skips and diverges at the same step."""
    if not stats.skipped:
        state.bad_in_row = 0
        return
    state.skipped_steps += 1
    state.bad_in_row += 1
    if verbose:
        print(f"warning: step {state.step}: non-finite loss/gradient (loss={stats.loss}, "
              f"grad_norm={stats.grad_norm}); update skipped ({state.bad_in_row} in a row)", file=sys.stderr)
    if state.bad_in_row > max_bad:
        raise TrainingDiverged(
            f"training diverged: {state.bad_in_row} consecutive steps with a non-finite loss or gradient "
            f"(train.max_bad_steps={max_bad}) at step {state.step}; lower train.lr, enable train.grad_clip, "
            "or resume from an earlier checkpoint"
        )


def _summary(run: Run, stats: StepResult | None, wall: float) -> dict[str, Any]:
    state = run.state
    summary = {
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens_seen": state.tokens_seen,
        "wall_s": round(wall, 1),
        "final_loss": stats.loss if stats else None,
        "final_lm_loss": stats.lm_loss if stats else None,
        "final_diffusion_loss": stats.diffusion_loss if stats else None,
        "checkpoint": str(ckpt_mod.find_latest(run.out)),
        "world_size": run.info.world_size,
    }
    data_stats = getattr(run.loader, "stats", None)
    if data_stats is not None and hasattr(data_stats, "to_dict"):
        summary["data"] = data_stats.to_dict()  # skipped inputs of a user folder, by reason (this rank's)
        if run.info.is_main:
            print(data_stats.summary(), file=sys.stderr)
    if state.skipped_steps and run.info.is_main:
        print(f"note: {state.skipped_steps} step(s) skipped for non-finite loss/gradient", file=sys.stderr)
    return summary
