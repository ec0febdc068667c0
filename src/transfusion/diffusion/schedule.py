"""The DDPM forward process (paper §2.2): cosine noise schedule, eq. 2 noising, timestep sampling.

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,   eps ~ N(0, I)           (paper eq. 2)

abar follows Nichol & Dhariwal (2021): abar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2),
s = 0.008, discretised into T = 1000 steps with each beta clipped at 0.999. Index t = 0 is the least noisy
step (abar_0 ~ 1); a clean image fed for captioning is passed as x_0 with t = 0.

The schedule also knows what the network predicts (`diffusion.prediction`): eps (paper eq. 3, the default) or
v = sqrt(abar) eps - sqrt(1 - abar) x_0 (an option). `target` is the regression target of the loss and `to_eps`
turns the network's output back into eps for the samplers, so nothing else depends on the choice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transfusion.config import DiffusionConfig, LossWeighting, Prediction


def cosine_alphas_cumprod(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """(T,) float64 abar_t for t = 0..T-1."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor(
        [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=torch.float64,
    )
    return torch.cumprod(1 - betas, dim=0)


class NoiseSchedule:
    def __init__(self, num_steps: int = 1000, kind: str = "cosine", prediction: Prediction | str = "epsilon",
                 weighting: LossWeighting | str = "none", min_snr_gamma: float = 5.0):
        if kind != "cosine":
            raise ValueError(f"unknown noise schedule {kind!r}; available: 'cosine'")
        self.num_steps = num_steps
        self.prediction = Prediction(prediction)
        self.weighting, self.min_snr_gamma = LossWeighting(weighting), min_snr_gamma
        self.alphas_cumprod = cosine_alphas_cumprod(num_steps)  # (T,) float64

    @classmethod
    def from_config(cls, dc: DiffusionConfig) -> "NoiseSchedule":
        return cls(dc.num_train_steps, dc.schedule, dc.prediction, dc.loss_weighting, dc.min_snr_gamma)

    def abar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar at integer timesteps t (any shape), as `like`'s dtype/device."""
        return self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Eq. 2 for patch rows: x0, noise (P, D); t (P,) -> x_t (P, D)."""
        a = self.abar(t, x0).unsqueeze(-1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network learns to output for x_t = add_noise(x0, noise, t): (P, D)."""
        if self.prediction == Prediction.EPSILON:
            return noise
        a = self.abar(t, x0).unsqueeze(-1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def to_eps(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """The network's output (P, D) at x_t (P, D), t (P,) -> its eps estimate (identity for eps-prediction)."""
        if self.prediction == Prediction.EPSILON:
            return pred
        a = self.abar(t, x_t).unsqueeze(-1)
        return (1 - a).sqrt() * x_t + a.sqrt() * pred

    def loss_weight(self, t: Tensor) -> Tensor | None:
        """Per-timestep weight of the diffusion MSE at t (any shape), or None for the paper's uniform weight.

        Min-SNR-gamma: in x0 terms the eps-MSE is SNR(t) * |x0 - x0_hat|^2, so the low-noise timesteps dominate
        the gradient; capping that weight at gamma leaves relatively more of it for the high-noise timesteps,
        where an image's layout and colour are decided."""
        if self.weighting == LossWeighting.NONE:
            return None
        a = self.alphas_cumprod.to(t.device)[t.long()]
        snr = a / (1 - a)
        capped = snr.clamp(max=self.min_snr_gamma)
        return (capped / snr if self.prediction == Prediction.EPSILON else capped / (snr + 1)).float()

    def sample_timesteps(self, max_t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return uniform_timesteps(max_t, self.num_steps, generator)


def respaced_timesteps(num_train_steps: int, steps: int) -> Tensor:
    """Evenly spaced descending timesteps, e.g. (999, 995, ..., 0) for 250 of 1000."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"sampling steps must be in [1, {num_train_steps}], got {steps}")
    return torch.linspace(num_train_steps - 1, 0, steps).round().long()


def uniform_timesteps(max_t: Tensor, num_steps: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform integer t in [0, max_t] per image; max_t (N,) implements the §4.3.4 noise limit. Shared by the
    DDPM and flow schedules, so both objectives see the same timesteps for the same draw."""
    max_t = max_t.clamp(0, num_steps - 1)
    u = torch.rand(max_t.shape, generator=generator, device=max_t.device if generator is None
                   else generator.device)
    return torch.minimum((u.to(max_t.device) * (max_t + 1).float()).long(), max_t)
