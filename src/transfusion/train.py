"""The training loop: `train(cfg, out_dir, resume)` and one small helper per concern.

    build_model      meta-device construction -> parallelize -> to_empty -> init_weights (the FSDP2 path)
    train_step       grad-accumulated forward/backward, clipping, NaN/Inf skip, optimiser + EMA update
    split_rows       one MixedBatch -> grad_accum micro-batches (rows, their patches and images)
    _save / _restore checkpoint everything that makes a resumed run bit-identical to an uninterrupted one

Exact resume: the data order lives in the loader's state, the diffusion noise and timesteps come from one
explicit torch.Generator passed to the loss, and both are saved with the weights, optimiser and EMA. The
periodic sample grid uses its own generator, so sampling never perturbs the training stream.
"""

from __future__ import annotations

import contextlib
import math
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
from transfusion.batch import IGNORE, MixedBatch
from transfusion.config import Config, ConfigError
from transfusion.ema import EMA
from transfusion.metrics import MetricsLogger, plot_loss_curve, save_image_grid
from transfusion.optim import build_optimizer, lr_at, set_lr


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
    """Counters that travel with a checkpoint (the generator's state is saved separately as a tensor)."""

    step: int = 0  # optimiser steps attempted (skipped ones included: their data is consumed)
    skipped_steps: int = 0  # total steps skipped for a non-finite loss or gradient
    bad_in_row: int = 0
    tokens_seen: int = 0


@dataclass
class StepStats:
    loss: float
    lm_loss: float
    diffusion_loss: float
    grad_norm: float
    skipped: bool
    tokens: int
    n_images: int


# ------------------------------------------------------------------------------------------ construction


def resolve_device(cfg: Config) -> torch.device:
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply activation checkpointing / compile / sharding, in that order (torchtitan's order).

    Single process: only `train.compile` does anything (per block, in place, so state-dict keys do not change).
    Issue 6 (FSDP2) replaces this with `fully_shard` per block and on the root; it runs on the meta-device model,
    before `to_empty` and `init_weights`, which is why `build_model` is ordered the way it is.
    """
    if cfg.train.activation_checkpointing:
        raise ConfigError("train.activation_checkpointing is not implemented yet (comes with FSDP2, issue 6)")
    if cfg.train.compile:
        for block in getattr(model, "layers", []):
            block.compile()
    return model


def build_model(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """Build on the meta device (no memory, no init cost), parallelize, materialise, then initialise every
    parameter and buffer with `init_weights()` — the same path a sharded model takes."""
    from transfusion.model.transfusion import Transfusion

    with torch.device("meta"):
        model = Transfusion(cfg.model)
    model = parallelize(model, cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model


def setup_cpu_runtime(threads: int) -> None:
    """Intra-op threads (0 -> torch's default). On a busy machine, OpenMP's spin-waiting makes 2 threads far
    slower than 1 (12 s vs 2 s per tiny step measured on a shared 2-core box); OMP_WAIT_POLICY=PASSIVE helps."""
    if threads > 0:
        torch.set_num_threads(threads)


def _setup_runtime(cfg: Config) -> None:
    setup_cpu_runtime(cfg.train.threads)
    if cfg.train.grad_accum < 1 or cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be a positive multiple of "
            f"train.grad_accum={cfg.train.grad_accum}"
        )
    if cfg.train.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {cfg.train.steps}")


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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


# ------------------------------------------------------------------------------------------ one step


def _set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2 modules reduce-scatter gradients after every backward unless told not to: with grad accumulation
    only the last micro-batch needs the sync. A no-op for a plain module."""
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(enabled)



def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[MixedBatch],
    schedule: Any,
    cfg: Config,
    generator: torch.Generator,
    device: torch.device,
) -> StepStats:
    """Forward/backward every micro-batch, then clip and step — unless the loss or gradient is not finite, in
    which case the update is skipped (gradients dropped) and the caller counts it."""
    from transfusion.losses import transfusion_loss

    n_text = [int((mb.lm_targets != IGNORE).sum()) for mb in micro_batches]
    n_img = [mb.num_images for mb in micro_batches]
    tot_text, tot_img = sum(n_text), sum(n_img)
    lm_total = diff_total = 0.0
    tc = cfg.train
    for k, mb in enumerate(micro_batches):
        _set_grad_sync(model, k == len(micro_batches) - 1)
        with _autocast(device, tc.bf16):
            # normalised by the whole batch's counts, so the sum over micro-batches is the batch mean over text
            # targets and over images, whatever the split (and, with an all-reduce of the counts, across ranks)
            out = transfusion_loss(
                model, mb, schedule, lm_weight=tc.lm_weight, diffusion_weight=tc.diffusion_weight,
                generator=generator, normalizer=(tot_text, tot_img),
            )
        out.loss.backward()
        lm_total += float(out.lm_loss)
        diff_total += float(out.diffusion_loss)
    loss = tc.lm_weight * lm_total + tc.diffusion_weight * diff_total
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(mb.tokens.numel() for mb in micro_batches)
    return StepStats(loss, lm_total, diff_total, grad_norm, skipped, tokens, tot_img)


# ------------------------------------------------------------------------------------------ checkpoints


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"loss_generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _save(out: Path, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
          loader: Any, state: TrainState, generator: torch.Generator, tokenizer: Any) -> Path:
    train_state = {
        "trainer": asdict(state),
        "optimizer": optimizer.state_dict(),
        "loader": loader.state_dict(),
        "rng": _rng_state(generator),
    }
    return ckpt_mod.save_checkpoint(
        out, state.step, model, cfg, train_state=train_state,
        ema_state=ema.state_dict() if ema else None, tokenizer=tokenizer, keep=cfg.train.keep_checkpoints,
    )


def _restore(path: Path, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
             loader: Any, generator: torch.Generator) -> TrainState:
    loaded = ckpt_mod.load_checkpoint(path, model, cfg)
    ts = loaded.train_state
    # hyperparameters come from *this* run's config (a resumed run may change them); only moments are restored
    hparams = [{k: g[k] for k in ("weight_decay", "betas", "eps")} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ts["optimizer"])
        for group, h in zip(optimizer.param_groups, hparams):
            group.update(h)
        loader.load_state_dict(ts["loader"])
        generator.set_state(ts["rng"]["loss_generator"])
        torch.set_rng_state(ts["rng"]["torch_cpu"])
        if "torch_cuda" in ts["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ts["rng"]["torch_cuda"])
        state = TrainState(**ts["trainer"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ckpt_mod.CheckpointError(f"{loaded.path}: training state does not fit this run ({e})") from None
    if ema is not None:
        saved = ckpt_mod.load_ema_state(loaded.path)
        if saved is None:  # EMA switched on mid-run: start it from the current weights
            print(f"note: {loaded.path} has no EMA; starting the EMA from the loaded weights", file=sys.stderr)
            ema.__init__(model, ema.decay)
        else:
            try:
                ema.load_state_dict(saved)
            except (KeyError, ValueError) as e:
                raise ckpt_mod.CheckpointError(f"{loaded.path}: EMA does not fit the model ({e})") from None
    return state


# ------------------------------------------------------------------------------------------ samples


def sample_prompts(cfg: Config, n: int) -> list[str]:
    """Prompts for the periodic grid: for colour fashion, item i in colour i mod 8 (covers items and colours)."""
    if cfg.data.dataset != "colour_fashion":
        return []
    from transfusion.data.fashion import COLOUR_NAMES, ITEMS, caption

    return [caption(i % len(ITEMS), (i * 3) % len(COLOUR_NAMES)) for i in range(n)]


@torch.no_grad()
def write_samples(model: nn.Module, ema: EMA | None, tokenizer: Any, cfg: Config, path: Path) -> None:
    """Sample a small grid with the EMA weights (if any) and a fixed seed, restoring the training weights."""
    from transfusion.diffusion.schedule import NoiseSchedule
    from transfusion.generate import generate_images

    prompts = sample_prompts(cfg, cfg.train.sample_n)
    if not prompts:
        return
    schedule = NoiseSchedule(cfg.diffusion.num_train_steps)
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
    save_image_grid(images.float().cpu(), path, nrow=min(8, len(prompts)))


# ------------------------------------------------------------------------------------------ the loop


def _prepare_out(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: fresh run). Refuses to silently overwrite an existing run."""
    latest = ckpt_mod.find_latest(out)
    if latest is not None and not resume:
        raise ConfigError(f"{out} already holds a run ({latest.name}); pass --resume to continue it or pick another --out")
    if resume and latest is None:
        print(f"note: --resume but no checkpoint in {out}; starting from scratch", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    return latest if resume else None


@dataclass
class Run:
    """Everything one training run holds, so the loop below reads as the recipe and each concern is a method."""

    cfg: Config
    out: Path
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    loader: Any
    schedule: Any
    generator: torch.Generator  # diffusion noise + timesteps: saved, so a resumed run draws the same ones
    tokenizer: Any
    state: TrainState
    last_saved: int = -1

    def save(self) -> None:
        _save(self.out, self.cfg, self.model, self.optimizer, self.ema, self.loader, self.state, self.generator,
              self.tokenizer)
        self.last_saved = self.state.step

    def visuals(self) -> None:
        _write_visuals(self.out, self.model, self.ema, self.tokenizer, self.cfg, self.state.step)


def setup_run(cfg: Config, out: Path, resume: bool) -> Run:
    """Tokenizer, model, optimiser, EMA, loader, generator — restored from the latest checkpoint on resume."""
    from transfusion.data.loader import build_loader
    from transfusion.diffusion.schedule import NoiseSchedule
    from transfusion.tokenizer import Tokenizer

    _setup_runtime(cfg)
    resume_from = _prepare_out(out, resume)
    device = resolve_device(cfg)
    tokenizer = Tokenizer.load(cfg.data.tokenizer or None)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    torch.manual_seed(cfg.train.seed)  # init_weights draws from the global generator
    model = build_model(cfg, device)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    ema = EMA(model, cfg.train.ema) if cfg.train.ema > 0 else None
    loader = build_loader(cfg, tokenizer, split="train")
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    run = Run(cfg, out, device, model, optimizer, ema, loader, NoiseSchedule(cfg.diffusion.num_train_steps),
              generator, tokenizer, TrainState())
    if resume_from is not None:
        run.state = _restore(resume_from, cfg, model, optimizer, ema, loader, generator)
        run.last_saved = run.state.step
    (out / "config.toml").write_text(config_mod.dump_toml(cfg))
    return run


def train(cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train `cfg` into `out_dir` (checkpoints, metrics.jsonl, PNGs); returns a summary dict."""
    run = setup_run(cfg, Path(out_dir), resume)
    state, tc = run.state, cfg.train
    logger = MetricsLogger(run.out / "metrics.jsonl", resume_step=state.step if run.last_saved >= 0 else None)
    bar = tqdm(total=tc.steps, initial=state.step, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    batches = iter(run.loader)
    t_start = t_window = time.perf_counter()
    tok_window, stats = 0, None
    with StopAtStepBoundary() as stop:
        while state.step < tc.steps:
            lr = lr_at(state.step, tc)
            set_lr(run.optimizer, lr)
            batch = next(batches).to(run.device)
            stats = train_step(run.model, run.optimizer, split_rows(batch, tc.grad_accum), run.schedule, cfg,
                               run.generator, run.device)
            state.step += 1
            state.tokens_seen += stats.tokens
            tok_window += stats.tokens
            _count_bad(state, stats, tc.max_bad_steps)
            if not stats.skipped and run.ema is not None:
                run.ema.update(run.model, step=run.state.step)
            if state.step % tc.log_every == 0 or state.step == tc.steps or stats.skipped:
                tok_s = tok_window / max(1e-9, time.perf_counter() - t_window)
                logger.log(_log_record(state, stats, lr, tok_s))
                bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                tok_window, t_window = 0, time.perf_counter()
            bar.update(1)
            if tc.sample_every and state.step % tc.sample_every == 0 and state.step < tc.steps:
                run.visuals()
            if tc.ckpt_every and state.step % tc.ckpt_every == 0:
                run.save()
            if _should_stop(stop, tc, state, t_start):
                break
    bar.close()
    if run.last_saved != state.step:
        run.save()
    if not stop.requested:  # an interrupted user wants their prompt back, not a sample grid
        run.visuals()
    return _summary(run.out, state, stats, time.perf_counter() - t_start, run.loader)


def _log_record(state: TrainState, stats: StepStats, lr: float, tok_s: float) -> dict[str, Any]:
    return {
        "step": state.step, "loss": stats.loss, "lm_loss": stats.lm_loss, "diffusion_loss": stats.diffusion_loss,
        "lr": lr, "grad_norm": stats.grad_norm, "tokens_per_s": round(tok_s, 1), "n_images": stats.n_images,
        "skipped": stats.skipped, "skipped_steps": state.skipped_steps, "tokens_seen": state.tokens_seen,
    }


def _should_stop(stop: StopAtStepBoundary, tc: Any, state: TrainState, t_start: float) -> bool:
    if stop.requested:
        print(f"\ninterrupted at step {state.step}; saving a checkpoint (continue with --resume)", file=sys.stderr)
        return True
    if tc.time_limit_min and time.perf_counter() - t_start > 60 * tc.time_limit_min:
        # a wall-clock budget (the demo's): stop cleanly with a checkpoint; --resume continues the schedule
        print(f"\nnote: train.time_limit_min={tc.time_limit_min} reached at step {state.step}/{tc.steps}",
              file=sys.stderr)
        return True
    return False


def _count_bad(state: TrainState, stats: StepStats, max_bad: int) -> None:
    if not stats.skipped:
        state.bad_in_row = 0
        return
    state.skipped_steps += 1
    state.bad_in_row += 1
    print(f"warning: step {state.step}: non-finite loss/gradient (loss={stats.loss}, grad_norm={stats.grad_norm}); "
          f"update skipped ({state.bad_in_row} in a row)", file=sys.stderr)
    if state.bad_in_row > max_bad:
        raise TrainingDiverged(
            f"training diverged: {state.bad_in_row} consecutive steps with a non-finite loss or gradient "
            f"(train.max_bad_steps={max_bad}) at step {state.step}; lower train.lr, enable train.grad_clip, "
            "or resume from an earlier checkpoint"
        )


def _write_visuals(out: Path, model: nn.Module, ema: EMA | None, tokenizer: Any, cfg: Config, step: int) -> None:
    plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    if cfg.train.sample_n > 0:
        write_samples(model, ema, tokenizer, cfg, out / "samples" / f"step_{step:08d}.png")


def _summary(out: Path, state: TrainState, stats: StepStats | None, wall: float, loader: Any) -> dict[str, Any]:
    summary = {
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens_seen": state.tokens_seen,
        "wall_s": round(wall, 1),
        "final_loss": stats.loss if stats else None,
        "final_lm_loss": stats.lm_loss if stats else None,
        "final_diffusion_loss": stats.diffusion_loss if stats else None,
        "checkpoint": str(ckpt_mod.find_latest(out)),
    }
    data_stats = getattr(loader, "stats", None)
    if data_stats is not None and hasattr(data_stats, "to_dict"):
        summary["data"] = data_stats.to_dict()  # skipped inputs of a user folder, by reason
        print(data_stats.summary(), file=sys.stderr)
    if state.skipped_steps:
        print(f"note: {state.skipped_steps} step(s) skipped for non-finite loss/gradient", file=sys.stderr)
    return summary
