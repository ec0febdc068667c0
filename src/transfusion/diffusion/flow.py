"""Rectified flow (`diffusion.objective = "flow"`): an option beside the paper's DDPM, not a replacement.

    x_s = (1 - s) x_0 + s eps,   s = (t + 1) / T for the integer timestep t in [0, T)      (straight path)
    the network predicts the velocity u = dx_s/ds = eps - x_0; the loss is MSE on it

Timesteps stay integers in [0, T) so that everything else is shared with DDPM: the timestep embedding, the
per-image draw (uniform, as the paper's DDPM), the noise limit for image-first examples (t <= 500: s <= ~0.5),
and the KV-cached decoding. Sampling integrates dx/ds = u from s = 1 to s = 0 on a respaced grid of the same
timesteps, with Euler or Heun (2nd order; two network calls per step but the last), classifier-free guidance on
the velocity (linear, so the same combination as on eps), and optional x_0 clipping.

The peer (transfusion-pytorch) and systems such as SD3, BAGEL and JanusFlow train this objective. Its comparison
with eps and v at equal compute on the same scorer has not been run yet (issue 12 §3).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from transfusion.config import Sampler
from transfusion.diffusion.schedule import respaced_timesteps, uniform_timesteps

Predict = Callable[[Tensor, Tensor], Tensor]  # (x (..., D), t scalar long) -> guided network output
# True: a tqdm bar; a callable: called as progress(steps_done, steps_total) after every step (the web demo's live
# progress; it may raise to cancel the sampling); False: silent.
Progress = bool | Callable[[int, int], None]


class FlowSchedule:
    """The forward path and the regression target of rectified flow, on integer timesteps t in [0, T)."""

    def __init__(self, num_steps: int = 1000):
        self.num_steps = num_steps

    def sigma(self, t: Tensor, like: Tensor) -> Tensor:
        """s(t) = (t + 1) / T in (0, 1], as `like`'s dtype/device."""
        return (t.to(like.device).to(torch.float64) + 1).div(self.num_steps).to(like.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x0, noise (P, D); t (P,) -> x_s (P, D)."""
        s = self.sigma(t, x0).unsqueeze(-1)
        return (1 - s) * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The velocity eps - x0 (P, D), whatever t is."""
        return noise - x0

    def loss_weight(self, t: Tensor) -> None:
        """Uniform weight over t (the DDPM schedule's `loss_weighting` options do not apply here)."""
        return None

    def sample_timesteps(self, max_t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return uniform_timesteps(max_t, self.num_steps, generator)


class FlowSampler:
    """Euler / Heun integration of dx/ds = u from s = 1 down to s = 0 on `steps` respaced timesteps."""

    def __init__(self, schedule: FlowSchedule, steps: int = 250, kind: Sampler | str = Sampler.EULER,
                 clip_x0: float | None = None):
        self.schedule, self.kind, self.clip_x0 = schedule, Sampler(kind), clip_x0
        if self.kind not in (Sampler.EULER, Sampler.HEUN):
            raise ValueError(f"the flow objective samples with 'euler' or 'heun', not {self.kind.value!r}")
        self.timesteps = respaced_timesteps(schedule.num_steps, steps)  # (S,) descending
        s = schedule.sigma(self.timesteps, torch.zeros((), dtype=torch.float64))
        self.s = torch.cat([s, torch.zeros(1, dtype=torch.float64)])  # (S + 1,), ends at s = 0 (clean)

    def __len__(self) -> int:
        return len(self.timesteps)

    def to_guided_space(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """The network's output is already the velocity the sampler integrates."""
        return pred

    def _velocity(self, x: Tensor, u: Tensor, s: float) -> Tensor:
        if self.clip_x0 is None:
            return u
        x0 = (x - s * u).clamp(-self.clip_x0, self.clip_x0)  # x0 = x_s - s u on the straight path
        return (x - x0) / s

    def sample(self, x: Tensor, predict: Predict, generator: torch.Generator | None = None,
               progress: Progress = False) -> Tensor:
        """x (..., D) at s = 1 (pure noise) -> x_0. `predict(x, t)` returns the (guided) velocity at x."""
        for i in tqdm(range(len(self)), desc="flow", disable=progress is not True, leave=False):
            s, s_next = float(self.s[i]), float(self.s[i + 1])
            u = self._velocity(x, predict(x, self.timesteps[i]).float(), s)
            x_euler = x + (s_next - s) * u
            if self.kind == Sampler.EULER or i == len(self) - 1:  # Heun's last step: s_next = 0 has no velocity
                x = x_euler
                report(progress, i, len(self))
                continue
            u_next = self._velocity(x_euler, predict(x_euler, self.timesteps[i + 1]).float(), s_next)
            x = x + (s_next - s) * 0.5 * (u + u_next)
            report(progress, i, len(self))
        return x


def report(progress: Progress, i: int, total: int) -> None:
    """Step `i` (0-based) of `total` is done: tell a callable `progress`."""
    if callable(progress):
        progress(i + 1, total)
