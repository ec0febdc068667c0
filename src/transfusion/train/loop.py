"""The training loop: `train(cfg, out_dir, resume)`, the same code on 1 process or N torchrun ranks.

    parallel.process_group   process group (if torchrun), device mesh
    build_model("meta") -> parallelize -> materialize -> backends.convert_model     the model, built once
    step.train_step          grad-accumulated forward/backward, global loss, clipping, NaN/Inf skip, step
    _save / _restore         DCP checkpoints (checkpoint/dcp.py), resumable at any world size

Exact resume: the data order is the loader's step, the diffusion noise and timesteps are drawn per global row
from (seed, step, row) (step.noise_for_rows), and the weights, AdamW moments and EMA are checkpointed;
nothing else is random. The periodic sample grid uses its own generator, so sampling never perturbs training.
Rank 0 alone writes metrics.jsonl, config.toml and PNGs; every rank joins the collectives (steps, saves,
sampling) in the same order.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from transfusion import config as config_mod
from transfusion.backends import convert_model, setup_process
from transfusion.checkpoint import dcp, layout
from transfusion.checkpoint.layout import CheckpointError
from transfusion.config import Config, ConfigError
from transfusion.data.loader import build_loader
from transfusion.data.registry import get_dataset
from transfusion.diffusion import build_schedule
from transfusion.autoencoder.codec import image_codec
from transfusion.decoding import generate_images, sampling_args
from transfusion.log import log
from transfusion.metrics import DiskFullGuard, plot_loss_curve, save_image_grid
from transfusion.model.build import build_model
from transfusion.model.flops import StepFlops
from transfusion.parallel import process_group as pg
from transfusion.parallel.parallelize import materialize, parallelize
from transfusion.parallel.process_group import DistInfo
from transfusion.tokenizer import Tokenizer
from transfusion.train.ema import EMA
from transfusion.train.optim import build_optimizer, lr_at, set_lr
from transfusion.train.step import StepResult, split_rows, train_step
from transfusion.train.tb import RunLogger


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
    train_s: float = 0.0  # wall seconds in optimiser steps (data, forward, backward, update, EMA; not saves
    # or sample grids), summed over resumes: the x axis of time-to-quality curves
    init_from: str = ""  # the checkpoint a fine-tune's weights started from (train.init_from, resolved)
    flops: float = 0.0  # training FLOPs so far (model/flops.StepFlops), summed over resumes: the x axis of sweeps


# ------------------------------------------------------------------------------------------ construction


def _check_config(cfg: Config, world_size: int) -> None:
    """Errors a user can fix, raised before any step (every rank raises the same one, so none is left waiting
    in a collective)."""
    pg.check_global_batch(cfg.train, world_size)
    if cfg.train.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {cfg.train.steps}")


# ------------------------------------------------------------------------------------------ checkpoints


def _save(run: "Run") -> Path:
    """Collective: every rank writes its shards (DCP); rank 0 adds train_state.json, config, tokenizer."""
    train_state = {"trainer": asdict(run.state), "loader": run.loader.state_dict()}
    return dcp.save(run.out, run.state.step, run.model, run.optimizer, run.cfg, train_state, ema=run.ema,
                     tokenizer=run.tokenizer, keep=run.cfg.train.keep_checkpoints)


def _restore(path: Path, run: "Run") -> TrainState:
    """Collective: weights, AdamW moments, EMA, RNG, data position and counters from a checkpoint saved at any
    world size. Optimiser hyper-parameters stay this run's (a resumed run may change them)."""
    hparams = [{k: g[k] for k in ("weight_decay", "betas", "eps")} for g in run.optimizer.param_groups]
    loaded = dcp.load(path, run.model, run.optimizer, run.cfg, ema=run.ema)
    for group, h in zip(run.optimizer.param_groups, hparams):
        group.update(h)
    try:
        run.loader.load_state_dict(loaded.train_state["loader"])
        state = TrainState(**loaded.train_state["trainer"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{loaded.path}: training state does not fit this run ({e})") from None
    if run.ema is not None and not loaded.has_ema:  # EMA switched on mid-run: start it from the loaded weights
        if run.info.is_main:
            log.info(f"note: {loaded.path} has no EMA; starting the EMA from the loaded weights")
        run.ema.__init__(run.model, run.ema.decay)
    return state


def _init_from(source: str, run: "Run") -> Path:
    """Collective: a fresh run (step 0, new optimiser, data from its start) takes the weights, and the EMA if
    both have one, of `source` (a run's latest checkpoint or a step directory). Read by the DCP loader, the one
    path resume uses; another architecture or tokenizer is refused in one line before any tensor is read."""
    try:
        ckpt = layout.resolve(source)
    except CheckpointError as e:
        raise CheckpointError(f"--init-from: {e}") from None
    if not dcp.is_dcp_checkpoint(ckpt):
        raise CheckpointError(f"--init-from {ckpt}: a single-file export has no training shards; start from the "
                              "run's training checkpoint (checkpoints/step_*/ with dcp/)")
    try:
        layout.check_model_config(layout.read_config(ckpt).model, run.cfg.model, ckpt)
    except CheckpointError as e:  # one line: the differences, then what to do
        head, *diffs = str(e).splitlines()
        raise CheckpointError(f"--init-from: {head} {'; '.join(d.strip() for d in diffs)}; a fine-tune keeps the "
                              "source's architecture (copy its [model] section)") from None
    src_tok = ckpt / layout.TOKENIZER_FILE
    if src_tok.is_file() and Tokenizer.load(src_tok).hf.to_str() != run.tokenizer.hf.to_str():
        raise CheckpointError(f"--init-from {ckpt}: its tokenizer differs from this run's; set "
                              f"data.tokenizer = \"{src_tok}\"")
    with torch.random.fork_rng(devices=[]):  # dcp.load restores the source's RNG state; this run keeps its own
        loaded = dcp.load(ckpt, run.model, None, run.cfg, ema=run.ema)
    if run.ema is not None and not loaded.has_ema:  # start this run's EMA from the loaded weights
        run.ema.__init__(run.model, run.ema.decay)
    if run.info.is_main:
        log.info(f"initialised the weights{' and EMA' if run.ema is not None and loaded.has_ema else ''} from "
                 f"{ckpt} (its step {loaded.step}); optimiser and step start fresh")
    return ckpt


# ------------------------------------------------------------------------------------------ samples


@torch.no_grad()
def write_samples(model: nn.Module, ema: EMA | None, tokenizer: Any, cfg: Config, path: Path | None) -> None:
    """Sample a small grid with the EMA weights (if any) and a fixed seed, restoring the training weights.

    Under FSDP every rank must run this (the forward passes all-gather the weights) with the same prompts and
    seed, so every rank makes the same decisions; only the caller with a `path` (rank 0) writes the PNG."""
    prompts = get_dataset(cfg.data).sample_prompts(cfg.train.sample_n)
    if not prompts:
        return
    schedule = build_schedule(cfg.diffusion)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.train.seed + 12345)
    ctx = ema.swapped_into(model) if ema is not None else contextlib.nullcontext(model)
    was_training = model.training
    with ctx:
        model.eval()
        if cfg.model.family == config_mod.Family.CHAMELEON:  # codes sampled one by one, decoded by the VQ-VAE
            from transfusion.chameleon.decoding import generate_images as chameleon_images
            from transfusion.chameleon.vq import load_vq

            images = chameleon_images(model, tokenizer, load_vq(cfg, g.device), prompts,
                                      cfg_scale=cfg.diffusion.cfg_scale, generator=g)
        else:
            images = generate_images(model, tokenizer, prompts, schedule, generator=g, progress=False,
                                     codec=image_codec(cfg), **sampling_args(cfg.diffusion))
    model.train(was_training)
    if path is not None:
        save_image_grid(images.float().cpu(), path, nrow=min(8, len(prompts)))


# ------------------------------------------------------------------------------------------ the loop


def _prepare_out(out: Path, resume: bool, info: DistInfo) -> Path | None:
    """The checkpoint to resume from (None: fresh run). Refuses to silently overwrite an existing run.
    Every rank decides alike: no rank can write a checkpoint before all have passed here (model init is a
    collective)."""
    latest = layout.find_latest(out)
    if latest is not None and not resume:
        raise ConfigError(f"{out} already holds a run ({latest.name}); pass --resume to continue it or pick another --out")
    if resume and latest is None and info.is_main:
        log.info(f"note: --resume but no checkpoint in {out}; starting from scratch")
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
    outputs: DiskFullGuard = field(default_factory=DiskFullGuard)  # PNGs on a full disk: warn, train on

    def save(self) -> None:
        _save(self)
        self.last_saved = self.state.step

    def visuals(self) -> None:
        """Collective when sampling (every rank samples); rank 0 writes the files."""
        main = self.info.is_main
        if main:
            with self.outputs("loss_curve.png"):
                plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png", diffusion_target(self.cfg))
        if self.cfg.train.sample_n > 0:
            path = self.out / "samples" / f"step_{self.state.step:08d}.png" if main else None
            with self.outputs("sample grids (samples/)"):  # only the PNG write can fail so: after the collectives
                write_samples(self.model, self.ema, self.tokenizer, self.cfg, path)


def diffusion_target(cfg: Config) -> str:
    """What the diffusion loss regresses, for labels: eps, v or the flow velocity."""
    d = cfg.diffusion
    if d.objective.value == "flow":
        return "velocity"
    return "eps" if d.prediction.value == "epsilon" else "v"


def build_training_model(cfg: Config, info: DistInfo, mesh: Any | None) -> nn.Module:
    """The trainer's one construction path: a meta skeleton, parallelised, materialised (identical weights on
    1 process or N ranks), then the [runtime] kernel converters."""
    model = parallelize(build_model(cfg.model, device="meta"), cfg.train, mesh)
    materialize(model, cfg.model, info.device, cfg.train.seed, sharded=mesh is not None)
    convert_model(model, cfg.runtime, inference=False, compiled=cfg.train.compile)
    return model


def _record_vae(cfg: Config, resume_from: Path | None) -> None:
    """Latent images (data.vae): the autoencoder's fingerprint goes into the run's config, so the model is never
    decoded, resumed or evaluated with another VAE's latents (codec.py checks it on every load)."""
    from transfusion.autoencoder.codec import image_codec

    fingerprint = image_codec(cfg).fingerprint
    saved = layout.read_config(resume_from).data.vae_fingerprint if resume_from is not None else ""
    if saved and saved != fingerprint:
        raise ConfigError(f"{resume_from} was trained on the latents of another autoencoder (fingerprint "
                          f"{saved[:12]}); data.vae={cfg.data.vae!r} is {fingerprint[:12]}")
    cfg.data.vae_fingerprint = fingerprint


def setup_run(cfg: Config, out: Path, resume: bool, info: DistInfo) -> Run:
    """Tokenizer, model, optimiser, EMA, loader — restored from the latest checkpoint on resume."""
    resume_from = _prepare_out(out, resume, info)
    tokenizer = Tokenizer.load(cfg.data.tokenizer or None)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    if cfg.data.vae:
        _record_vae(cfg, resume_from)
    model = build_training_model(cfg, info, pg.build_mesh(info, cfg.train.hsdp_replicate))
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    ema = EMA(model, cfg.train.ema) if cfg.train.ema > 0 else None
    if cfg.model.family == config_mod.Family.CHAMELEON:  # images as VQ-VAE codes (chameleon/data.py)
        from transfusion.chameleon.data import build_chameleon_loader

        loader = build_chameleon_loader(cfg, tokenizer, "train", rank=info.rank, world_size=info.world_size)
    elif cfg.data.dataset == "shards":  # streamed, never loaded whole (data/shards_loader.py, docs/data.md)
        from transfusion.data.shards_loader import ShardLoader

        loader = ShardLoader(cfg, tokenizer, "train", rank=info.rank, world_size=info.world_size)
    else:
        loader = build_loader(cfg, tokenizer, "train", rank=info.rank, world_size=info.world_size)
    run = Run(cfg, out, info, model, optimizer, ema, loader, build_schedule(cfg.diffusion),
              tokenizer, TrainState())
    if resume_from is not None:
        run.state = _restore(resume_from, run)
        run.last_saved = run.state.step
    elif cfg.train.init_from:  # a fine-tune: weights from another run, everything else fresh
        run.state.init_from = str(_init_from(cfg.train.init_from, run))
    if info.is_main:
        (out / "config.toml").write_text(config_mod.dump_toml(cfg))
    return run


def train(cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train `cfg` into `out_dir` (checkpoints, metrics.jsonl, PNGs); returns a summary dict.
    Under torchrun every rank calls this; the process group lives exactly as long as the call."""
    setup_process(cfg.runtime)
    info = pg.init_distributed(cfg.train.device)
    try:
        _check_config(cfg, info.world_size)
        run = setup_run(cfg, Path(out_dir), resume, info)
        return _loop(run, progress and info.is_main)
    finally:
        pg.destroy_distributed()


def _loop(run: Run, progress: bool) -> dict[str, Any]:
    state, cfg, tc, info = run.state, run.cfg, run.cfg.train, run.info
    logger = None
    if info.is_main:
        # metrics.jsonl with mfu, and TensorBoard (train/tb.py)
        logger = RunLogger(run.out, cfg, info.device, info.world_size,
                           resume_step=state.step if run.last_saved >= 0 else None)
    bar = tqdm(total=tc.steps, initial=state.step, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    batches = iter(run.loader)
    rows = tc.batch_size // info.world_size  # this rank's rows: global rows [rank*rows, (rank+1)*rows)
    t_start = t_window = time.perf_counter()
    tok_window, stats = 0, None
    step_flops = StepFlops(cfg.model)
    with StopAtStepBoundary() as stop:
        while state.step < tc.steps:
            t_step = time.perf_counter()
            lr = lr_at(state.step, tc)
            set_lr(run.optimizer, lr)
            batch = next(batches).to(info.device)
            stats = train_step(run.model, run.optimizer, split_rows(batch, tc.grad_accum), run.schedule, cfg,
                               state.step, info.rank * rows, info)
            if not stats.skipped and run.ema is not None:
                run.ema.update(run.model, step=state.step)  # the step just taken: the decay warms up with it
            state.step += 1
            state.tokens_seen += stats.tokens
            state.flops += step_flops(stats.tokens, cfg.data.seq_len, stats.n_targets, stats.n_encoded)
            state.train_s += time.perf_counter() - t_step
            tok_window += stats.tokens
            _count_bad(state, stats, tc.max_bad_steps, info.is_main)
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
    if logger is not None:
        logger.close()  # TensorBoard: the final sample grid, then flush
    return _summary(run, stats, time.perf_counter() - t_start)


def _log_record(state: TrainState, stats: StepResult, lr: float, tok_s: float) -> dict[str, Any]:
    return {
        "step": state.step, "loss": stats.loss, "lm_loss": stats.lm_loss, "diffusion_loss": stats.diffusion_loss,
        "lr": lr, "grad_norm": stats.grad_norm, "tokens_per_s": round(tok_s, 1), "n_images": stats.n_images,
        "skipped": stats.skipped, "skipped_steps": state.skipped_steps, "tokens_seen": state.tokens_seen,
        "train_s": round(state.train_s, 2), "flops": state.flops,
        **({"z_loss": stats.z_loss} if stats.z_loss is not None else {}),
    }


def _should_stop(stop: StopAtStepBoundary, tc: Any, state: TrainState, t_start: float, info: DistInfo) -> bool:
    """Ctrl-C or the time budget. Ranks see the signal and the clock at different moments, so they vote (one
    all_reduce per step; identity on one process): all stop at the same step or none does."""
    over_time = bool(tc.time_limit_min) and time.perf_counter() - t_start > 60 * tc.time_limit_min
    interrupted, over_time = (v > 0 for v in pg.all_reduce_sum([stop.requested, over_time], info.device))
    stop.requested = stop.requested or interrupted
    if interrupted:
        if info.is_main:
            log.info(f"\ninterrupted at step {state.step}; saving a checkpoint (continue with --resume)")
        return True
    if over_time:
        # a wall-clock budget (the demo's): stop cleanly with a checkpoint; --resume continues the schedule
        if info.is_main:
            log.info(f"\nnote: train.time_limit_min={tc.time_limit_min} reached at step {state.step}/{tc.steps}")
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
        log.warning(f"step {state.step}: non-finite loss/gradient (loss={stats.loss}, "
                    f"grad_norm={stats.grad_norm}); update skipped ({state.bad_in_row} in a row)")
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
        "checkpoint": str(layout.find_latest(run.out)),
        "world_size": run.info.world_size,
    }
    if state.init_from:
        summary["init_from"] = state.init_from
    data_stats = getattr(run.loader, "stats", None)
    if data_stats is not None and hasattr(data_stats, "to_dict"):
        summary["data"] = data_stats.to_dict()  # skipped inputs of a user folder, by reason (this rank's)
        if run.info.is_main:
            log.info(data_stats.summary())
    if state.skipped_steps and run.info.is_main:
        log.info(f"note: {state.skipped_steps} step(s) skipped for non-finite loss/gradient")
    return summary
