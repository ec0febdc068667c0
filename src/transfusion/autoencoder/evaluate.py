"""`transfusion eval-vae`: reconstruction quality of an autoencoder on the test split of its dataset.

- PSNR: 10 log10(1 / MSE) per image on [0, 1] pixels, averaged over images.
- SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2 on [0, 1] pixels,
  computed per channel over the valid region and averaged (as the paper's reference implementation).
- rFID: FID (evaluate/fid.py, the offline TorchScript Inception) between test images and their reconstructions;
  skipped with the reason when the network is not installed or fewer than 2 images are asked for.
- VQ: codebook usage (fraction of codes used on the test split) and perplexity exp(H) of the code histogram.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.autoencoder.checkpoint import load_autoencoder, resolve
from transfusion.autoencoder.data import image_set, spread
from transfusion.autoencoder.model import Autoencoder
from transfusion.autoencoder.quantize import code_stats
from transfusion.backends import setup_process
from transfusion.log import log


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [-1, 1]: (N, C, H, W) x2 -> (N,)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2.0).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM of images in [-1, 1]: (N, C, H, W) x2 -> (N,). Images smaller than the window use the
    largest odd window that fits."""
    a = x.double().clamp(-1, 1).add(1).div(2)  # (N, C, H, W) on [0, 1]
    b = y.double().clamp(-1, 1).add(1).div(2)
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2  # odd
    C = a.shape[1]
    w = _gaussian_window(size, sigma).to(a.device).expand(C, 1, size, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=C)  # valid region only

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


@torch.no_grad()
def reconstruct(model: Autoencoder, images: Tensor, batch_size: int) -> tuple[Tensor, Tensor | None]:
    """Reconstructions (KL: from the posterior mean) and, for a VQ-VAE, the code histogram (K,)."""
    recons, counts = [], None
    if model.quantizer is not None:
        counts = torch.zeros(model.codebook_size, dtype=torch.long)
    for batch in images.split(batch_size):
        out = model(batch, sample=False)
        recons.append(out.recon.clamp(-1, 1))
        if counts is not None:
            counts += torch.bincount(out.quant.indices.flatten().cpu(), minlength=len(counts))
    return torch.cat(recons), counts


def _rfid(real: Tensor, recon: Tensor, n: int) -> dict[str, Any]:
    if n < 2:
        return {"rfid": None, "rfid_skipped": f"--fid-n {n}: FID needs at least 2 images"}
    try:
        from transfusion.evaluate.fid import InceptionMissing, fid
    except ImportError as e:  # scipy missing (the [eval] extra)
        return {"rfid": None, "rfid_skipped": f"FID unavailable ({e})"}
    pick = spread(len(real), n)
    try:
        value = fid(recon[pick].cpu(), real[pick].cpu())
    except InceptionMissing as e:
        return {"rfid": None, "rfid_skipped": str(e)}
    return {"rfid": round(value, 3), "rfid_n": len(pick)}


def evaluate_vae(ckpt: str | Path, n: int = 0, fid_n: int = 250, batch_size: int = 64) -> dict[str, Any]:
    """The report of `eval-vae` for the autoencoder at `ckpt` (run or step directory); `n` test images (0: all)."""
    step_dir, cfg = resolve(ckpt)
    setup_process(cfg.runtime)
    model = load_autoencoder(step_dir)
    test = image_set(cfg.data, "test", cfg.vae.image_size, cfg.vae.image_channels)
    idx = spread(len(test), n or len(test))
    t0 = time.perf_counter()
    real = torch.cat([test.render(b) for b in idx.split(1024)])
    recon, counts = reconstruct(model, real, batch_size)
    report: dict[str, Any] = {
        "checkpoint": str(step_dir), "kind": cfg.vae.kind.value, "dataset": cfg.data.dataset, "split": "test",
        "image_size": cfg.vae.image_size, "factor": cfg.vae.factor, "latent_channels": cfg.vae.latent_channels,
        "n_images": len(real), "psnr": round(float(psnr(real, recon).mean()), 3),
        "ssim": round(float(ssim(real, recon).mean()), 4), "fingerprint": model.fingerprint(),
    }
    if counts is not None:
        report.update(code_stats(counts), codebook_size=model.codebook_size)
    report.update(_rfid(real, recon, min(fid_n, len(real))))
    report["eval_s"] = round(time.perf_counter() - t0, 1)
    if not bool(model.latent_scale_ready):
        log.warning(f"{step_dir} has no latent statistics (an intermediate checkpoint): encode() is unscaled")
    return report


def write_report(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)
