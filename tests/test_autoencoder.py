"""The autoencoders (src/transfusion/autoencoder/): shapes and the public API, the KL and VQ losses (straight-
through gradient, commitment placement, dead codes), the GAN start and adaptive weight, exact resume, eval-vae,
the latent cache, configs and CLI bad input. Tiny networks on 16x16 colour fashion: seconds on one thread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from transfusion.autoencoder import AutoencoderError, load_autoencoder
from transfusion.autoencoder import config as ae_config
from transfusion.autoencoder.cache import split_latents
from transfusion.autoencoder.checkpoint import DISC_FILE
from transfusion.autoencoder.config import VAEConfig
from transfusion.autoencoder.evaluate import psnr, ssim
from transfusion.autoencoder.losses import AELoss, adaptive_weight
from transfusion.autoencoder.model import Autoencoder, Posterior
from transfusion.autoencoder.networks import PatchDiscriminator
from transfusion.autoencoder.quantize import VectorQuantizer, code_stats
from transfusion.autoencoder.train import setup, train_step, train_vae
from transfusion.checkpoint.layout import LATEST, MODEL_FILE
from transfusion.cli import main
from transfusion.config import ConfigError
from transfusion.data.image_text import ImageTextSet
from transfusion.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "vae" / "fashion_tiny.toml"


def tiny_vae(kind: str = "kl", factor: int = 4, **kw) -> Autoencoder:
    widths = [8, 16, 16] if factor == 4 else [8, 8, 16, 16]
    torch.manual_seed(0)
    return Autoencoder(VAEConfig(kind=kind, image_size=16, factor=factor, widths=widths, norm_groups=4,
                                 codebook_size=32, **kw)).eval()


def tiny_cfg(*overrides: str) -> ae_config.AEConfig:
    return ae_config.load(TINY, list(overrides))


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ------------------------------------------------------------------------------------------ shapes and API


@pytest.mark.parametrize("kind,factor", [("kl", 4), ("vq", 4), ("kl", 8)])
def test_shapes_and_round_trip(kind: str, factor: int) -> None:
    ae = tiny_vae(kind, factor)
    x = images()
    z = ae.encode(x)
    assert z.shape == (2, 4, 16 // factor, 16 // factor) and (ae.latent_channels, ae.factor) == (4, factor)
    assert ae.decode(z).shape == x.shape
    # encode() scales, decode() unscales: with non-trivial statistics the round trip is the raw one
    ae.latent_shift.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    ae.latent_scale.copy_(torch.tensor([2.0, 0.5, 3.0, 1.0]))
    with torch.no_grad():
        raw = ae.raw_latents(x)
        shift, scale = ae.latent_shift.view(1, -1, 1, 1), ae.latent_scale.view(1, -1, 1, 1)
        assert torch.allclose(ae.encode(x), (raw - shift) / scale)
        assert torch.allclose(ae.decode(ae.encode(x)), ae.decode_raw(raw), atol=1e-5)
    with pytest.raises(AutoencoderError, match="multiple of the factor"):
        ae.encode(images(size=18))


def test_kl_mode_and_sample() -> None:
    ae = tiny_vae("kl")
    x = images()
    assert torch.equal(ae.encode(x), ae.encode(x))  # the posterior mean by default
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(ae.encode(x, sample=True, generator=g), ae.encode(x))
    with pytest.raises(AutoencoderError, match="VQ-VAE"):
        ae.encode_indices(x)
    with pytest.raises(AutoencoderError):
        ae.codebook_size


def test_vq_indices_api() -> None:
    ae = tiny_vae("vq")
    x = images()
    idx = ae.encode_indices(x)
    assert idx.shape == (2, 4, 4) and idx.dtype == torch.long and ae.codebook_size == 32
    assert 0 <= int(idx.min()) and int(idx.max()) < 32
    assert torch.allclose(ae.decode_indices(idx), ae.decode(ae.encode(x)), atol=1e-5)
    with pytest.raises(AutoencoderError, match="lie in"):
        ae.decode_indices(torch.full((1, 4, 4), 32, dtype=torch.long))


def test_fingerprint_changes_with_weights_and_config() -> None:
    a, b = tiny_vae("kl"), tiny_vae("kl")
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.decoder.conv_out.bias.add_(1e-3)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() != tiny_vae("kl", attention=False).fingerprint()


# ------------------------------------------------------------------------------------------ losses


def test_kl_closed_form_and_loss_weighting() -> None:
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3) * 0.5
    post = Posterior(mean, logvar)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, post.std),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(), ref, atol=1e-5)
    assert torch.allclose(Posterior(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)).kl(), torch.zeros(1))
    # before the GAN starts the objective is L1 + 1e-6 * (per-image KL sum / pixel count), nothing else
    cfg = tiny_cfg()
    ae = tiny_vae("kl").train()
    loss = AELoss(cfg.loss, PatchDiscriminator(3, 8, 2), gan_start=10)
    x = images()
    out = ae(x, sample=False)
    parts = loss.generator_loss(ae, x, out, step=0)
    expected = (out.recon - x).abs().mean() + 1e-6 * out.posterior.kl().mean() / x[0].numel()
    assert torch.allclose(parts.total, expected) and "g_loss" not in parts.logs


def test_vq_straight_through_gradient() -> None:
    q = VectorQuantizer(16, 4, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    assert torch.allclose(out.z_q, q.lookup(out.indices))  # forward: the codes
    w = torch.randn_like(z)
    (out.z_q * w).sum().backward()
    assert torch.equal(z.grad, w)  # backward: identity to the encoder output
    assert q.codebook.weight.grad is None  # the decoder's gradient never reaches the codes


def test_commitment_placement() -> None:
    """beta multiplies the commitment term (encoder side), not the codebook term (taming's legacy placement)."""
    beta = 0.25
    q = VectorQuantizer(8, 4, beta=beta)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    out.loss.backward()
    n = z.numel()
    z_q = out.z_q.detach()
    assert torch.allclose(z.grad, beta * 2.0 * (z.detach() - z_q) / n, atol=1e-7)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    per_position = 2.0 * (z_q.permute(0, 2, 3, 1).reshape(-1, 4) - flat) / n
    expected = torch.zeros(8, 4).index_add_(0, out.indices.flatten(), per_position)
    assert torch.allclose(q.codebook.weight.grad, expected, atol=1e-7)  # weight 1 on the codebook term
    assert torch.allclose(out.loss, out.codebook_loss + beta * out.commitment_loss)


def test_dead_code_restart_and_kmeans() -> None:
    g = torch.Generator().manual_seed(0)
    q = VectorQuantizer(8, 2, beta=0.25)
    z = torch.randn(4, 2, 4, 4, generator=g) + 5.0  # data far from the initial codes
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    before = q.codebook.weight.detach().clone()
    q.usage.copy_(torch.tensor([1.0, 0.0, 1.0, 0.001, 1.0, 1.0, 1.0, 0.0]))
    assert q.restart_dead(z, threshold=0.03, generator=g) == 3
    w = q.codebook.weight.detach()
    for code in (1, 3, 7):  # moved onto encoder outputs, with a fresh grace period
        assert (flat - w[code]).abs().sum(1).min() < 1e-6 and q.usage[code] == 1.0
    for code in (0, 2, 4, 5, 6):
        assert torch.equal(w[code], before[code])
    q.update_usage(torch.zeros(10, dtype=torch.long), decay=0.5)
    assert q.usage[0] == 0.5 * 1.0 + 0.5 * 10 and q.usage[1] == 0.5
    # k-means: every code lands on the data, and the flag makes it happen once per run
    q2 = VectorQuantizer(8, 2, beta=0.25)
    q2.kmeans_init(z, iters=5, generator=g)
    assert bool(q2.initialized) and (q2.codebook.weight.mean(1) > 3.0).all()
    assert code_stats(torch.tensor([4, 4, 0, 0]))["codebook_usage"] == 0.5
    assert abs(code_stats(torch.tensor([4, 4, 0, 0]))["perplexity"] - 2.0) < 1e-9


def test_adaptive_weight() -> None:
    last = torch.randn(3, 3, requires_grad=True)
    nll = (last * 2.0).sum()  # gradient norm 2 * 3 = 6
    g = (last * 0.5).sum()  # gradient norm 0.5 * 3 = 1.5
    w = adaptive_weight(nll, g, last, max_weight=1e4)
    assert abs(float(w) - 6.0 / (1.5 + 1e-4)) < 1e-4 and not w.requires_grad
    assert float(adaptive_weight((last * 2.0).sum(), (last * 1e-9).sum(), last, max_weight=10.0)) == 10.0


def test_gan_starts_at_its_step(tmp_path) -> None:
    """No discriminator work (loss, gradients, updates) before train.gan_start; both from it on."""
    run = setup(tiny_cfg("train.gan_start=2"), tmp_path / "run", resume=False)
    before = {k: v.clone() for k, v in run.loss.discriminator.state_dict().items()}
    for step in range(4):
        logs = train_step(run)
        run.step += 1
        changed = any(not torch.equal(v, run.loss.discriminator.state_dict()[k]) for k, v in before.items())
        assert ("d_loss" in logs) == ("g_loss" in logs) == ("d_weight" in logs) == (step >= 2)
        assert changed == (step >= 2)
        if step < 2:  # not even a gradient: the discriminator was never called
            assert all(p.grad is None for p in run.loss.discriminator.parameters())


# ------------------------------------------------------------------------------------------ training runs


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(run / "metrics.jsonl")]


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_exact_resume(tmp_path, kind: str) -> None:
    """Killed after step 3 and resumed, a run logs the same losses and ends with the same weights."""
    over = [f"vae.kind={kind}", "train.steps=6", "train.ckpt_every=3", "train.keep_checkpoints=0",
            "train.gan_start=2", "vae.restart_every=2", "train.recon_n=2"]
    full = tmp_path / "full"
    train_vae(tiny_cfg(*over), full, progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    (cut / "checkpoints" / LATEST).write_text("step_00000003\n")
    with pytest.raises(ConfigError, match="--resume"):
        train_vae(tiny_cfg(*over), cut, progress=False)
    train_vae(tiny_cfg(*over), cut, resume=True, progress=False)
    assert _records(cut) == _records(full) and len(_records(full)) == 6
    for name in (MODEL_FILE, DISC_FILE):
        a = (full / "checkpoints" / "step_00000006" / name).read_bytes()
        assert a == (cut / "checkpoints" / "step_00000006" / name).read_bytes(), name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae")
    runs = {}
    for kind in ("kl", "vq"):
        runs[kind] = root / kind
        assert main(["train-vae", str(TINY), "--out", str(runs[kind]), "--no-progress",
                     "--set", f"vae.kind={kind}", "--set", "train.steps=8", "--set", "train.scale_images=256"]) == 0
    return runs


def test_load_vq_refuses_a_kl_vae(trained) -> None:
    from transfusion.autoencoder import load_vq
    from transfusion.checkpoint import CheckpointError

    assert load_vq(trained["vq"]).codebook_size == 64
    with pytest.raises(CheckpointError, match="KL-VAE"):
        load_vq(trained["kl"])


def test_run_outputs_and_latent_scale(trained) -> None:
    run = trained["kl"]
    assert (run / "recon" / "step_00000008.png").is_file() and len(read_metrics(run / "metrics.jsonl")) == 8
    ae = load_autoencoder(run)
    assert bool(ae.latent_scale_ready) and not ae.training
    cfg = ae_config.load(run / "config.toml")
    from transfusion.autoencoder.data import image_set

    train = image_set(cfg.data, "train", 16)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.train.seed))[:256]
    with torch.no_grad():
        z = ae.encode(train.render(idx))  # the same images the statistics came from: exactly standardised
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-3)


def test_eval_vae_json(trained, tmp_path, capsys) -> None:
    for kind, run in trained.items():
        out = tmp_path / f"{kind}.json"
        assert main(["eval-vae", "--ckpt", str(run), "--n", "64", "--fid-n", "0", "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["n_images"] == 64 and report["kind"] == kind
        assert 0 < report["psnr"] < 100 and -1 <= report["ssim"] <= 1
        assert report["rfid"] is None and "FID needs" in report["rfid_skipped"]
        if kind == "vq":
            assert 0 < report["codebook_usage"] <= 1 and 1 <= report["perplexity"] <= report["codebook_size"]
    assert '"psnr"' in capsys.readouterr().out  # the report is printed too


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W, C) images on [0, 1] written with scipy's Gaussian filter (radius 5 = an 11x11
    window, sigma 1.5), averaged over the valid region and channels: an independent check of evaluate.ssim."""
    from scipy.ndimage import gaussian_filter

    def blur(t: np.ndarray) -> np.ndarray:
        return gaussian_filter(t, sigma=1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]

    vals = []
    for c in range(a.shape[2]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        vals.append((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(vals))


def test_psnr_and_ssim() -> None:
    x = images(3, 24)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(3)) and (psnr(x, x) > 90).all()
    slight, strong = (x + 0.1 * noise).clamp(-1, 1), (x + 0.5 * noise).clamp(-1, 1)
    assert (ssim(x, strong) < ssim(x, slight)).all() and (ssim(x, slight) < 1).all()
    assert (psnr(x, strong) < psnr(x, slight)).all()
    mse = ((x - strong) / 2).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, strong), -10 * torch.log10(mse), atol=1e-4)
    a, b = [((t[0].permute(1, 2, 0).numpy() + 1) / 2) for t in (x, strong)]
    assert abs(float(ssim(x[:1], strong[:1])) - _ssim_reference(a, b)) < 1e-5


# ------------------------------------------------------------------------------------------ latent cache


def _image_set(seed: int) -> ImageTextSet:
    pixels = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (10, 3, 16, 16), dtype=np.uint8))
    return ImageTextSet(pixels=pixels, caption_of=np.zeros(10, dtype=np.int64), caption_sets=[[]], image_size=16,
                        name="random")


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_latent_cache_invalidation(tmp_path, kind: str) -> None:
    ae, data = tiny_vae(kind), _image_set(0)
    first = split_latents(ae, data, "train", root=tmp_path, batch_size=4, shard_size=4)
    assert first.computed and len(first) == 10 and len(list(first.path.glob("shard_*.safetensors"))) == 3
    with torch.no_grad():
        assert torch.allclose(first.latents, ae.encode(data.render(torch.arange(10))), atol=1e-5)
    if kind == "vq":
        assert torch.equal(first.indices, ae.encode_indices(data.render(torch.arange(10))))
    else:
        assert first.std is not None and first.std.shape == first.latents.shape
    again = split_latents(ae, data, "train", root=tmp_path)
    assert not again.computed and torch.equal(again.latents, first.latents)
    # a different VAE (one weight moved) or different images: new keys, never the old latents
    other = tiny_vae(kind)
    with torch.no_grad():
        other.encoder.conv_in.bias.add_(0.1)
    changed = split_latents(other, data, "train", root=tmp_path)
    assert changed.computed and changed.path.parent != first.path.parent
    assert split_latents(ae, _image_set(1), "train", root=tmp_path).computed
    assert split_latents(ae, data, "test", root=tmp_path).computed
    # a damaged cache is recomputed, not read
    (first.path / "meta.json").write_text("{")
    assert split_latents(ae, data, "train", root=tmp_path).computed


# ------------------------------------------------------------------------------------------ configs and CLI


def test_shipped_configs_load_and_twins_match() -> None:
    kl, vq = (ae_config.load(ROOT / "configs" / "vae" / f"emoji_{k}.toml") for k in ("kl", "vq"))
    assert (kl.vae.kind.value, vq.vae.kind.value) == ("kl", "vq")
    assert (kl.vae.image_size, kl.vae.factor, kl.vae.latent_channels) == (64, 4, 4)
    a, b = ae_config.to_dict(kl), ae_config.to_dict(vq)
    assert a["train"] == b["train"] and a["data"] == b["data"] and a["runtime"] == b["runtime"]
    same_arch = ("image_size", "latent_channels", "factor", "widths", "blocks", "attention", "norm_groups")
    assert all(a["vae"][k] == b["vae"][k] for k in same_arch)
    assert ae_config.load(ae_config_dump(kl)) == kl


def ae_config_dump(cfg: ae_config.AEConfig) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "c.toml"
    path.write_text(ae_config.dump_toml(cfg))
    return path


@pytest.mark.parametrize("override,match", [
    ("vae.widht=3", "unknown config key 'vae.widht'"),
    ("vae.kind=gan", "vae.kind='gan'"),
    ("vae.factor=3", "power of two"),
    ("vae.widths=[8, 16]", "needs log2"),
    ("loss.lpips=1.0", "lpips_weights"),
    ("model.dim=3", r"unknown config table \[model\]"),
    ("train.steps=0", "train.steps must be >= 1"),
])
def test_config_errors(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(override)


@pytest.mark.parametrize("argv,match", [
    (["train-vae", "missing.toml", "--out", "{tmp}/r"], "not found"),
    (["train-vae", str(TINY), "--out", "{tmp}/r", "--set", "vae.codebok_size=3"], "unknown config key"),
    (["train-vae", str(TINY), "--out", "{tmp}/r", "--set", "loss.moco=0.2", "--set", "loss.moco_weights=/no/file"],
     "no such file"),
    (["eval-vae", "--ckpt", "{tmp}/nothing"], "does not exist"),
    (["eval-vae", "--ckpt", "{tmp}", "--fid-n", "-1"], "--fid-n"),
])
def test_cli_bad_input(tmp_path, capsys, argv: list[str], match: str) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err


def test_saved_widths_list_of_integers_reads_back(tmp_path) -> None:
    """vae.widths is a list[int]: a saved config reads back (a list[str] check once refused every VAE checkpoint),
    and a list of anything else is one ConfigError."""
    cfg = tiny_cfg()
    path = tmp_path / "config.toml"
    path.write_text(ae_config.dump_toml(cfg))
    assert ae_config.load(path).vae.widths == cfg.vae.widths
    with pytest.raises(ConfigError, match="list of integers"):
        tiny_cfg('vae.widths=["a", "b", "c"]')
