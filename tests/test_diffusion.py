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


def _x0_from_eps(s: NoiseSchedule, x_t, eps, t):
    a = s.alphas_cumprod[t].float()[:, None]
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def test_add_noise_is_eq2():
    s = NoiseSchedule()
    x0, eps = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.tensor([0, 10, 500, 900, 999])
    a = s.alphas_cumprod[t].float()[:, None]
    assert torch.allclose(s.add_noise(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.allclose(_x0_from_eps(s, s.add_noise(x0, eps, t), eps, t)[:3], x0[:3], atol=1e-4)


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


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_prediction_target_round_trips_to_eps(prediction):
    """to_eps(x_t, target(x0, eps, t), t) == eps at every t, so the samplers see eps whatever the network predicts."""
    schedule = NoiseSchedule(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(1000, 12, generator=g) * 2 - 1, torch.randn(1000, 12, generator=g)
    t = torch.arange(1000)
    x_t = schedule.add_noise(x0, eps, t)
    target = schedule.target(x0, eps, t)
    assert torch.allclose(schedule.to_eps(x_t, target, t), eps, atol=1e-4)
    if prediction == "epsilon":
        assert torch.equal(target, eps)
    else:  # v -> -x0 at the noisiest step and -> eps at the cleanest: no identity map of x_t to learn
        assert torch.allclose(target[-1], -x0[-1], atol=1e-2) and torch.allclose(target[0], eps[0], atol=1e-2)


def test_v_prediction_oracle_through_the_decoder_recovers_x0():
    """An oracle network that outputs the exact v drives the KV-cached decoder's DDIM loop to the known x0."""
    from transfusion.decoding import Decoder

    schedule = NoiseSchedule(prediction="v")
    x0 = torch.rand(1, 4, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1  # (n_cond, n, D)

    sampler = DiffusionSampler(schedule, 20, Sampler.DDIM)
    dec = object.__new__(Decoder)  # a decoder shell whose network is the oracle below
    dec.next_pos, dec.n, dec.patch_dim, dec.device = torch.zeros(1, dtype=torch.long), 4, 3, torch.device("cpu")
    dec.n_images, dec.pad_id = torch.zeros(1, dtype=torch.long), 0

    def run(tokens, image_ids, doc_ids, positions, x, t=None, commit=True, logits=True):
        eps = (x - schedule.abar(t, x).sqrt()[:, None] * x0[0]) / (1 - schedule.abar(t, x)).sqrt()[:, None]
        dec.last_out = schedule.target(x0[0], eps, t)

    dec._run = run
    out = Decoder.diffuse(dec, sampler, cfg_scale=1.0, n_cond=1, generator=torch.Generator().manual_seed(0),
                          commit=False)
    assert (out - x0).abs().max() < 1e-4


def test_min_snr_weighting_caps_low_noise_timesteps():
    from transfusion.config import ConfigError, DiffusionConfig

    t = torch.tensor([0, 100, 500, 900, 999])
    assert NoiseSchedule().loss_weight(t) is None  # the paper's uniform weighting
    eps = NoiseSchedule(weighting="min_snr", min_snr_gamma=5.0)
    w = eps.loss_weight(t)
    a = eps.alphas_cumprod[t]
    snr = a / (1 - a)
    assert torch.allclose(w, (snr.clamp(max=5.0) / snr).float())
    assert w[0] < 1e-3 and w[-1] == 1.0 and bool((w[1:] >= w[:-1]).all())  # low noise capped, high noise kept
    v = NoiseSchedule(prediction="v", weighting="min_snr").loss_weight(t)
    assert torch.allclose(v, (snr.clamp(max=5.0) / (snr + 1)).float())
    with pytest.raises(ConfigError, match="loss_weighting"):
        DiffusionConfig(objective="flow", sampler="euler", loss_weighting="min_snr")
