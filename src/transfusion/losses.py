"""The Transfusion objective (paper §3.2, eq. 4): L = L_LM + lambda * L_DDPM, lambda = 5 by default.

- L_LM: next-token cross-entropy over text targets only (batch.lm_targets; none on patches, none when the
  input is BOI, fn. 8), averaged over target tokens.
- L_DDPM: eps-prediction MSE (eq. 3; the MSE to v with diffusion.prediction = "v", or to the velocity with
  diffusion.objective = "flow": each schedule's `target`),
  averaged over each image's patch values first, then over images, so a large image counts as one example like
  a small one; `diffusion.loss_weighting = "min_snr"` (an option) weights each image's term by its timestep.

Each image gets its own timestep (uniform in [0, image_max_t], the §4.3.4 noise limit for image-first
examples); noise and timesteps are drawn from an explicit generator so training is reproducible and resumable.
A CLEAN image (batch.CLEAN, the input image of an edit, §4.5) is given exactly as x_0 at t = 0, as decoding gives
a conditioning image, and is no diffusion target: it adds nothing to L_DDPM and is not counted among its images.
`normalizer` lets data-parallel training divide the local sums by *global* counts, which makes N ranks compute
exactly the loss of one process on the whole batch.

Options of the Chameleon baseline (docs/sweeps.md):
- z-loss (train.z_loss, Chameleon §2.3 after PaLM): + w * mean over the LM targets of log^2 Z, Z = sum exp(logits)
  of the LM head at that position; it pulls log Z to 0 so the logits cannot drift. 0 -> not computed at all.
- `chameleon_loss`: the baseline's objective, next-token cross-entropy over text *and* image-code targets
  (images are VQ-VAE codes in the vocabulary, chameleon/), no diffusion term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.batch import CLEAN, IGNORE, MixedBatch
from transfusion.diffusion.flow import FlowSchedule
from transfusion.diffusion.schedule import NoiseSchedule


@dataclass
class LossOutput:
    loss: Tensor  # scalar to backpropagate
    lm_loss: Tensor  # scalar, mean over text targets (detached)
    diffusion_loss: Tensor  # scalar, mean over images (detached)
    z_loss: Tensor | None = None  # scalar, mean log^2 Z over the LM targets (detached); None when train.z_loss = 0


def z_loss_sum(logits: Tensor) -> Tensor:
    """Sum over positions of log^2 Z, Z the softmax normaliser: (n, V) logits -> scalar (float32)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).sum()


def noised_patches(batch: MixedBatch, schedule: NoiseSchedule | FlowSchedule,
                   generator: torch.Generator | None = None, draw: tuple[Tensor, Tensor] | None = None):
    """Draw per-image timesteps and noise; return (x_t (P, D), t (P,), noise (P, D), image of each patch (P,)).

    `draw` = (t per image (N,), noise (P, D)) supplied by the caller instead: data-parallel training draws them
    per global row so that N ranks use exactly the noise one process would (train/step.py: noise_for_rows)."""
    patch_image = batch.image_ids[batch.image_ids >= 0]  # (P,) image index of each patch, reading order
    if draw is not None:
        t_img, noise = draw[0], draw[1].to(batch.patches)
    else:
        t_img = schedule.sample_timesteps(batch.image_max_t, generator)  # (N,)
        dev = generator.device if generator is not None else batch.patches.device
        noise = torch.randn(batch.patches.shape, generator=generator, device=dev).to(batch.patches)
    t = t_img[patch_image]  # (P,)
    x_t = schedule.add_noise(batch.patches, noise, t)
    clean = batch.image_max_t == CLEAN  # (N,)
    if bool(clean.any()):  # conditioning images: exactly x_0 at t = 0 (no-op, and skipped, for other batches)
        clean_patch = clean[patch_image]  # (P,)
        t = t.masked_fill(clean_patch, 0)
        x_t = torch.where(clean_patch.unsqueeze(-1), batch.patches, x_t)
    return x_t, t, noise, patch_image


def transfusion_loss(
    model: torch.nn.Module,
    batch: MixedBatch,
    schedule: NoiseSchedule | FlowSchedule,
    lm_weight: float = 1.0,
    diffusion_weight: float = 5.0,
    generator: torch.Generator | None = None,
    normalizer: tuple[float, float] | None = None,  # (global text targets, global images)
    noise_draw: tuple[Tensor, Tensor] | None = None,  # (t per image, noise) instead of drawing from generator
    z_loss_weight: float = 0.0,  # train.z_loss (module docstring)
) -> LossOutput:
    x_t, t, noise, patch_image = noised_patches(batch, schedule, generator, noise_draw)
    logits_mask = batch.lm_targets != IGNORE  # (B, L)
    out = model(batch.tokens, batch.image_ids, batch.doc_ids, batch.positions, x_t, t, logits_mask=logits_mask)

    targets = batch.lm_targets[logits_mask]  # (n_sel,)
    lm_sum = F.cross_entropy(out.logits.float(), targets, reduction="sum")

    n_img = batch.num_images
    target = schedule.target(batch.patches.float(), noise.float(), t)  # (P, D): eps, or v (an option)
    per_value = (out.diffusion.float() - target).pow(2)  # (P, D)
    per_patch = per_value.sum(-1)  # (P,)
    weight = schedule.loss_weight(t)  # (P,), or None for the paper's uniform weighting
    if weight is not None:  # diffusion.loss_weighting: every patch of an image shares its t, hence its weight
        per_patch = per_patch * weight
    sums = torch.zeros(n_img, device=per_value.device).index_add(0, patch_image, per_patch)
    counts = torch.bincount(patch_image, minlength=n_img).clamp(min=1) * per_value.shape[-1]
    per_image = sums / counts  # (N,) each image's mean squared error
    n_diffused = n_img
    if not bool(batch.diffused.all()):  # CLEAN images are conditioning, not targets
        per_image = torch.where(batch.diffused.to(per_image.device), per_image, 0.0)
        n_diffused = int(batch.diffused.sum())
    diff_sum = per_image.sum()  # sum over the diffused images of each one's mean squared error

    n_tok_norm, n_img_norm = normalizer if normalizer is not None else (targets.numel(), n_diffused)
    lm = lm_sum / max(n_tok_norm, 1)
    diff = diff_sum / max(n_img_norm, 1)
    loss = lm_weight * lm + diffusion_weight * diff
    z = None
    if z_loss_weight > 0:  # off: the loss is today's, bit for bit
        z = z_loss_sum(out.logits) / max(n_tok_norm, 1)
        loss = loss + z_loss_weight * z
        z = z.detach()
    return LossOutput(loss=loss, lm_loss=lm.detach(), diffusion_loss=diff.detach(), z_loss=z)


def chameleon_loss(
    model: torch.nn.Module,
    batch: MixedBatch,
    normalizer: tuple[float, float] | None = None,  # (global LM targets, unused)
    z_loss_weight: float = 0.0,
) -> LossOutput:
    """The Chameleon baseline: next-token CE over every target of `batch.lm_targets`, text and image codes alike.

    The batch comes from chameleon/data.py: images are code tokens (image_ids all -1, no patches), and its
    targets include BOI -> first code (that is how an image is generated; Transfusion's fn. 8 rule exists because
    there the first patch is a diffusion target, here it is a token) and last code -> EOI."""
    logits_mask = batch.lm_targets != IGNORE  # (B, L)
    logits = model(batch.tokens, batch.doc_ids, batch.positions, logits_mask=logits_mask)  # (n_sel, V + K)
    targets = batch.lm_targets[logits_mask]  # (n_sel,)
    n_norm = normalizer[0] if normalizer is not None else targets.numel()
    lm = F.cross_entropy(logits.float(), targets, reduction="sum") / max(n_norm, 1)
    loss, z = lm, None
    if z_loss_weight > 0:
        z = z_loss_sum(logits) / max(n_norm, 1)
        loss = loss + z_loss_weight * z
        z = z.detach()
    return LossOutput(loss=loss, lm_loss=lm.detach(), diffusion_loss=torch.zeros((), device=lm.device), z_loss=z)
