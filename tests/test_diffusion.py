import pytest
import torch

from transfusion.config import Sampler
from transfusion.diffusion.samplers import DiffusionSampler, cfg_combine, respaced_timesteps
from transfusion.diffusion.schedule import NoiseSchedule


def test_cosine_schedule_values():
    s = NoiseSchedule(1000)
    a = s.alphas_cumprod
    assert a.shape == (1000,)
    assert bool((a[1:] < a[:-1]).all())  # strictly decreasing
    assert a[0] > 0.9999 and a[-1] < 1e-4
    assert abs(float(a[499]) - 0.5) < 0.03  # cosine: about half the signal at mid-schedule


def test_add_noise_is_eq2():
    s = NoiseSchedule()
    x0, eps = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.tensor([0, 10, 500, 900, 999])
    a = s.alphas_cumprod[t].float()[:, None]
    assert torch.allclose(s.add_noise(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.allclose(s.predict_x0(s.add_noise(x0, eps, t), eps, t)[:3], x0[:3], atol=1e-4)


def test_noise_limit_respected_and_range_covered():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    max_t = torch.tensor([999] * 5000 + [500] * 5000)
    t = s.sample_timesteps(max_t, g)
    assert int(t[5000:].max()) <= 500 and int(t[5000:].max()) >= 495
    assert int(t[:5000].max()) > 990 and int(t.min()) == 0
    assert abs(float(t[:5000].float().mean()) - 499.5) < 15


def test_respacing():
    ts = respaced_timesteps(1000, 250)
    assert len(ts) == 250 and int(ts[0]) == 999 and int(ts[-1]) == 0
    assert bool((ts[1:] < ts[:-1]).all())
    with pytest.raises(ValueError):
        respaced_timesteps(1000, 0)


@pytest.mark.parametrize("kind", [Sampler.DDPM, Sampler.DDIM])
@pytest.mark.parametrize("steps", [250, 50, 10])
def test_oracle_eps_recovers_x0(kind, steps):
    """A sampler fed the exact noise of a known x0 at every step must land on x0."""
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 16, 12, generator=g) * 2 - 1
    sampler = DiffusionSampler(schedule, steps, kind)
    x = torch.randn(x0.shape, generator=g)
    for i, t in enumerate(sampler.timesteps):
        a = float(schedule.alphas_cumprod[t])
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5  # oracle
        x = sampler.step(x, eps, i, g)
    assert (x - x0).abs().max() < 1e-4


def test_cfg_combine():
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(cfg_combine(c, u, 1.0), c)
    assert torch.allclose(cfg_combine(c, u, 0.0), u)
    assert torch.allclose(cfg_combine(c, u, 3.0), u + 3 * (c - u))
