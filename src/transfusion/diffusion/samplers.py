"""Reverse-process samplers on a respaced subset of the training timesteps, and classifier-free guidance.

DDPM (ancestral, the paper's choice) and DDIM (eta = 0, an option) both walk a descending list of timesteps,
default 250 of the 1000 used in training (paper §4.1). For a respaced pair (t, t') the step uses
abar_t and abar_t' directly, so the process is the DDPM one restricted to that subsequence (Nichol & Dhariwal
2021, §4). The final step goes to abar = 1, returning the model's x_0 estimate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transfusion.config import Sampler
from transfusion.diffusion.schedule import NoiseSchedule


def respaced_timesteps(num_train_steps: int, steps: int) -> Tensor:
    """Evenly spaced descending timesteps, e.g. (999, 995, ..., 0) for 250 of 1000."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"sampling steps must be in [1, {num_train_steps}], got {steps}")
    return torch.linspace(num_train_steps - 1, 0, steps).round().long()


def cfg_combine(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w * (eps_c - eps_u); w = 1 is no guidance."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


class DiffusionSampler:
    """Stateless stepper: `x = sampler.step(x, eps, i)` for i over `sampler.timesteps`."""

    def __init__(self, schedule: NoiseSchedule, steps: int = 250, kind: Sampler | str = Sampler.DDPM,
                 clip_x0: float | None = None):
        self.schedule = schedule
        self.kind = Sampler(kind)
        self.timesteps = respaced_timesteps(schedule.num_steps, steps)  # (S,) descending
        abar = schedule.alphas_cumprod
        self.abar_t = abar[self.timesteps]  # (S,) float64
        self.abar_prev = torch.cat([abar[self.timesteps[1:]], torch.ones(1, dtype=abar.dtype)])
        self.clip_x0 = clip_x0  # e.g. 1.0 for pixels in [-1, 1]; None for latents

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, x_t: Tensor, eps: Tensor, i: int, generator: torch.Generator | None = None) -> Tensor:
        """One reverse step from timesteps[i] to timesteps[i+1] (or to x_0 after the last)."""
        a_t, a_prev = float(self.abar_t[i]), float(self.abar_prev[i])
        x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        if self.kind == Sampler.DDIM:
            return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        # DDPM posterior q(x_prev | x_t, x0) for the respaced pair (Ho et al. 2020, eq. 7)
        beta = 1 - a_t / a_prev
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x_t
        if i == len(self) - 1:
            return mean
        var = beta * (1 - a_prev) / (1 - a_t)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + var**0.5 * noise
