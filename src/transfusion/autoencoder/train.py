"""`transfusion train-vae`: train a KL-VAE or its VQ twin (paper App. A) on a dataset of the registry.

    OUT/config.toml  OUT/metrics.jsonl  OUT/recon/step_XXXXXXXX.png (test originals over reconstructions)
    OUT/checkpoints/step_XXXXXXXX/      (autoencoder/checkpoint.py)

One step: a batch drawn with the run's generator -> autoencoder pass (KL: a posterior sample) -> generator-side
loss (L1 + regulariser, + the adaptive-weighted GAN term from train.gan_start) -> Adam step -> (VQ) codebook
usage and dead-code restarts -> (from gan_start) one discriminator step on the same batch. All randomness of a
run (batches, posterior noise, k-means, restarts) comes from one torch.Generator saved in every checkpoint, so a
resumed run takes exactly the steps an uninterrupted one would.

After the last step the latent statistics (mean/std of the raw latents of train.scale_images training images)
are measured and saved with the weights, so `encode` gives ~unit-variance latents.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from transfusion.autoencoder import checkpoint as ae_ckpt
from transfusion.autoencoder import config as ae_config
from transfusion.autoencoder.config import AEConfig, AEKind, ScaleMode
from transfusion.autoencoder.data import image_set, spread
from transfusion.autoencoder.losses import AELoss
from transfusion.autoencoder.model import Autoencoder
from transfusion.autoencoder.networks import PatchDiscriminator, count_params
from transfusion.backends import setup_process
from transfusion.checkpoint import layout
from transfusion.config import ConfigError
from transfusion.data.image_text import ImageTextSet
from transfusion.log import log
from transfusion.metrics import MetricsLogger, save_image_grid


@dataclass
class AERun:
    """Everything one autoencoder run holds; the loop below reads as the recipe."""

    cfg: AEConfig
    out: Path
    device: torch.device
    model: Autoencoder
    loss: AELoss
    optimizers: dict[str, torch.optim.Optimizer]
    generator: torch.Generator
    train_images: ImageTextSet
    test_images: ImageTextSet
    step: int = 0
    train_s: float = 0.0
    last_saved: int = -1
    last_logs: dict[str, float] = field(default_factory=dict)

    def batch(self) -> torch.Tensor:  # (B, 3, S, S) in [-1, 1]
        idx = torch.randint(len(self.train_images), (self.cfg.train.batch_size,), generator=self.generator)
        return self.train_images.render(idx).to(self.device)

    def save(self) -> Path:
        path = ae_ckpt.save_checkpoint(self.out, self.step, self.cfg, self.model, self.loss.discriminator,
                                       self.optimizers, self.generator, {"train_s": self.train_s},
                                       self.cfg.train.keep_checkpoints)
        self.last_saved = self.step
        return path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, base: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _check(cfg: AEConfig) -> None:
    if PatchDiscriminator.output_size(cfg.vae.image_size, cfg.loss.disc_layers) < 1 and cfg.loss.gan > 0:
        raise ConfigError(f"loss.disc_layers={cfg.loss.disc_layers} halves vae.image_size={cfg.vae.image_size} "
                          "below the PatchGAN's receptive field; use fewer layers")


def setup(cfg: AEConfig, out: Path, resume: bool) -> AERun:
    _check(cfg)
    latest = layout.find_latest(out)
    if latest is not None and not resume:
        raise ConfigError(f"{out} already holds a run ({latest.name}); pass --resume to continue it or pick "
                          "another --out")
    out.mkdir(parents=True, exist_ok=True)
    tc, device = cfg.train, pick_device(cfg.train.device)
    S, C = cfg.vae.image_size, cfg.vae.image_channels
    train_images, test_images = image_set(cfg.data, "train", S, C), image_set(cfg.data, "test", S, C)
    torch.manual_seed(tc.seed)  # weight init only; the run's randomness is `generator`
    model = Autoencoder(cfg.vae).to(device)
    disc = PatchDiscriminator(C, cfg.loss.disc_width, cfg.loss.disc_layers).to(device)
    betas = (tc.beta1, tc.beta2)
    optimizers = {"ae": torch.optim.Adam(model.parameters(), lr=tc.lr, betas=betas),
                  "disc": torch.optim.Adam(disc.parameters(), lr=tc.disc_lr, betas=betas)}
    run = AERun(cfg, out, device, model, AELoss(cfg.loss, disc, tc.gan_start).to(device), optimizers,
                torch.Generator().manual_seed(tc.seed), train_images, test_images)
    if resume and latest is not None:
        state = ae_ckpt.load_training_state(latest, model, disc, optimizers, run.generator)
        run.step = run.last_saved = int(state["step"])
        run.train_s = float(state.get("train_s", 0.0))
        log.info(f"resuming from {latest} (step {run.step})")
    elif resume:
        log.info(f"note: --resume but no checkpoint in {out}; starting from scratch")
    (out / "config.toml").write_text(ae_config.dump_toml(cfg))
    return run


def train_step(run: AERun) -> dict[str, float]:
    """One optimiser step of the autoencoder (and, from gan_start, of the discriminator)."""
    cfg, model, g = run.cfg, run.model, run.generator
    images = run.batch()
    q = model.quantizer
    if q is not None and cfg.vae.kmeans_init and not bool(q.initialized):
        with torch.no_grad():  # every code starts on data (dead-code remedy 1)
            q.kmeans_init(model.quantize(images)[0], cfg.vae.kmeans_iters, g)
    tc = cfg.train
    for name, base in (("ae", tc.lr), ("disc", tc.disc_lr)):
        for group in run.optimizers[name].param_groups:
            group["lr"] = lr_at(run.step, base, tc.min_lr * base / tc.lr, tc.warmup_steps, tc.steps)
    disc = run.loss.discriminator
    disc.requires_grad_(False)  # the generator's loss must not leave gradients in the discriminator
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=tc.bf16)
    with autocast:
        out = model(images, sample=True, generator=g)
        parts = run.loss.generator_loss(model, images, out, run.step)
    opt = run.optimizers["ae"]
    opt.zero_grad(set_to_none=True)
    parts.total.backward()
    if tc.grad_clip > 0:
        parts.logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
    opt.step()
    logs = dict(parts.logs, lr=run.optimizers["ae"].param_groups[0]["lr"])
    if q is not None:
        q.update_usage(out.quant.indices, cfg.vae.usage_decay)
        if cfg.vae.restart_every and (run.step + 1) % cfg.vae.restart_every == 0:  # dead-code remedy 2
            logs["codes_restarted"] = q.restart_dead(out.z_e, cfg.vae.restart_threshold, g)
        logs["codes_alive"] = int((q.usage >= cfg.vae.restart_threshold).sum())
    disc.requires_grad_(True)
    if run.loss.gan_active(run.step):
        with autocast:
            d_parts = run.loss.discriminator_loss(images, out.recon)
        d_opt = run.optimizers["disc"]
        d_opt.zero_grad(set_to_none=True)
        d_parts.total.backward()
        d_opt.step()
        logs.update(d_parts.logs)
    mse = (out.recon.detach().clamp(-1, 1) - images).pow(2).mean().div(4.0)  # on [0, 1]
    logs["psnr"] = float(-10.0 * torch.log10(mse.clamp_min(1e-10)))
    return logs


@torch.no_grad()
def measure_latent_stats(model: Autoencoder, images: ImageTextSet, n: int, seed: int, batch_size: int = 64) -> None:
    """Set the model's latent shift/scale to the mean/std of the raw latents (KL: posterior means; VQ: codes)
    of `n` training images chosen by `seed`."""
    device = model.latent_shift.device
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    was_training = model.training
    model.eval()
    lat = torch.cat([model.raw_latents(images.render(b).to(device)).float().cpu()
                     for b in idx.split(batch_size)])  # (n, C, h, w)
    model.train(was_training)
    if model.cfg.scale_mode == ScaleMode.CHANNEL:
        mean, std = lat.mean(dim=(0, 2, 3)), lat.std(dim=(0, 2, 3))
    else:
        mean, std = lat.mean().view(1), lat.std().view(1)
    model.latent_shift.copy_(mean)
    model.latent_scale.copy_(std.clamp_min(1e-6))
    model.latent_scale_ready.fill_(True)


@torch.no_grad()
def write_recon_grid(run: AERun) -> Path:
    """Test originals (top row) over their reconstructions (bottom row)."""
    n = run.cfg.train.recon_n
    x = run.test_images.render(spread(len(run.test_images), n)).to(run.device)
    was_training = run.model.training
    run.model.eval()
    rec = run.model(x, sample=False).recon.clamp(-1, 1)
    run.model.train(was_training)
    path = run.out / "recon" / f"step_{run.step:08d}.png"
    scale = max(1, 128 // run.cfg.vae.image_size)
    save_image_grid(torch.cat([x, rec]).float().cpu(), path, nrow=len(x), scale=scale)
    return path


def train_vae(cfg: AEConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train `cfg` into `out_dir`; returns a summary dict (also the CLI's JSON output)."""
    setup_process(cfg.runtime)
    run = setup(cfg, Path(out_dir), resume)
    tc = cfg.train
    metrics = MetricsLogger(run.out / "metrics.jsonl", resume_step=run.step if run.last_saved >= 0 else None)
    bar = tqdm(total=tc.steps, initial=run.step, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    run.model.train()
    t_start = time.perf_counter()
    while run.step < tc.steps:
        t0 = time.perf_counter()
        logs = train_step(run)
        run.step += 1
        dt = time.perf_counter() - t0
        run.train_s += dt
        run.last_logs = logs
        if run.step % tc.log_every == 0 or run.step == tc.steps:
            metrics.log({"step": run.step, **logs, "images_per_s": round(tc.batch_size / dt, 2)})
            bar.set_postfix(l1=f"{logs['l1']:.4f}", psnr=f"{logs['psnr']:.1f}", refresh=False)
        bar.update(1)
        if tc.recon_every and run.step % tc.recon_every == 0:
            write_recon_grid(run)
        if tc.ckpt_every and run.step % tc.ckpt_every == 0 and run.step < tc.steps:
            run.save()
        if tc.time_limit_min and time.perf_counter() - t_start > 60 * tc.time_limit_min:
            log.info(f"train.time_limit_min={tc.time_limit_min} reached at step {run.step}; stopping")
            break
    bar.close()
    measure_latent_stats(run.model, run.train_images, tc.scale_images, tc.seed)
    ckpt = run.save()  # the final checkpoint carries the latent statistics
    grid = write_recon_grid(run)
    return _summary(run, ckpt, grid)


def _summary(run: AERun, ckpt: Path, grid: Path) -> dict[str, Any]:
    m = run.model
    return {
        "kind": run.cfg.vae.kind.value, "steps": run.step, "train_s": round(run.train_s, 1),
        "params": count_params(m), "disc_params": count_params(run.loss.discriminator),
        "latent_shape": [m.latent_channels, run.cfg.vae.latent_size, run.cfg.vae.latent_size],
        "latent_shift": [round(v, 4) for v in m.latent_shift.tolist()],
        "latent_scale": [round(v, 4) for v in m.latent_scale.tolist()],
        "last": {k: round(v, 5) if isinstance(v, float) else v for k, v in run.last_logs.items()},
        "checkpoint": str(ckpt), "recon_grid": str(grid), "fingerprint": m.fingerprint(),
        **({"codebook_size": m.codebook_size} if run.cfg.vae.kind == AEKind.VQ else {}),
    }
