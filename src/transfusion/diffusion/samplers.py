"""Reverse-process samplers on a respaced subset of the training timesteps, and classifier-free guidance.
(Rectified flow's Euler / Heun sampler is in flow.py; `build_sampler` picks by schedule.)

DDPM (ancestral, the paper's choice) and DDIM (eta = 0, an option) both walk a descending list of timesteps,
default 250 of the 1000 used in training (paper §4.1). For a respaced pair (t, t') the step uses
abar_t and abar_t' directly, so the process is the DDPM one restricted to that subsequence (Nichol & Dhariwal
2021, §4). The final step goes to abar = 1, returning the model's x_0 estimate.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from transfusion.config import Sampler
from transfusion.diffusion.flow import FlowSampler, FlowSchedule, Predict, Progress, report
from transfusion.diffusion.schedule import NoiseSchedule, respaced_timesteps

__all__ = ["DiffusionSampler", "FlowSampler", "build_sampler", "cfg_combine", "respaced_timesteps"]


def cfg_combine(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w * (eps_c - eps_u); w = 1 is no guidance."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


class DiffusionSampler:
    """DDPM / DDIM: `x = sampler.sample(x, predict)`, or step by step `x = sampler.step(x, eps, i)`."""

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

    def to_guided_space(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """The network's output (eps or v) -> eps, the quantity CFG combines and `step` consumes."""
        return self.schedule.to_eps(x_t, pred, t)

    def sample(self, x: Tensor, predict: Predict, generator: torch.Generator | None = None,
               progress: Progress = False) -> Tensor:
        """x (..., D) at the noisiest timestep -> x_0. `predict(x, t)` returns the (guided) eps at x."""
        for i in tqdm(range(len(self)), desc="diffusion", disable=progress is not True, leave=False):
            x = self.step(x, predict(x, self.timesteps[i]).float(), i, generator)
            report(progress, i, len(self))
        return x

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


def build_sampler(schedule: NoiseSchedule | FlowSchedule, steps: int, kind: Sampler | str,
                  clip_x0: float | None = None) -> DiffusionSampler | FlowSampler:
    """The sampler of a schedule: DDPM / DDIM for the paper's objective, Euler / Heun for rectified flow."""
    if isinstance(schedule, FlowSchedule):
        return FlowSampler(schedule, steps, kind, clip_x0)
    if Sampler(kind) not in (Sampler.DDPM, Sampler.DDIM):
        raise ValueError(f"the DDPM objective samples with 'ddpm' or 'ddim', not {Sampler(kind).value!r}")
    return DiffusionSampler(schedule, steps, kind, clip_x0)
