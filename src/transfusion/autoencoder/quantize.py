"""Vector quantisation (van den Oord et al. 2017) for the VQ-VAE twin: nearest codebook vector, straight-through
gradient, codebook + commitment loss, and the remedies for dead codes.

Loss (paper App. A, beta = 0.25, weight 1.0):
    L_codebook = ||sg(z) - z_q||^2  +  beta * ||z - sg(z_q)||^2
The first term moves the codes towards the encoder outputs; the second (the commitment term, weighted by beta)
keeps the encoder near its codes. taming's `VectorQuantizer2` with its default `legacy=True` puts beta on the
first term instead, which under-trains the codes and over-weights the encoder's commitment; we follow the paper.

Dead codes: a code no encoder output is near never gets a gradient and stays dead. Two remedies: the codebook
starts as k-means centroids of a real batch of encoder outputs (so every code starts where data is), and codes
whose running usage falls below a threshold are moved onto random encoder outputs of the current batch.
Both are explicit calls of the training step (`kmeans_init`, `update_usage`, `restart_dead`), so `forward`
stays a pure function of its inputs and the codebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class QuantOut:
    z_q: Tensor  # (B, C, h, w) straight-through quantised latents: value z_q, gradient of z
    indices: Tensor  # (B, h, w) long
    codebook_loss: Tensor  # scalar: ||sg(z) - z_q||^2 (mean over elements)
    commitment_loss: Tensor  # scalar: ||z - sg(z_q)||^2 (mean over elements), before beta
    loss: Tensor  # codebook_loss + beta * commitment_loss


class VectorQuantizer(nn.Module):
    def __init__(self, n_codes: int, dim: int, beta: float) -> None:
        super().__init__()
        self.n_codes, self.dim, self.beta = n_codes, dim, beta
        self.codebook = nn.Embedding(n_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / n_codes, 1.0 / n_codes)
        # training state, saved with the weights so a resumed run continues exactly
        self.register_buffer("usage", torch.ones(n_codes))  # running assignments per step (start "alive")
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # k-means done

    def nearest(self, flat: Tensor) -> Tensor:
        """(N, C) -> (N,) index of the nearest code (squared L2; |z|^2 is the same for every code, dropped)."""
        e = self.codebook.weight  # (K, C)
        dist = e.pow(2).sum(1)[None, :] - 2.0 * flat @ e.t()  # (N, K)
        return dist.argmin(dim=1)

    def forward(self, z: Tensor) -> QuantOut:  # z: (B, C, h, w)
        B, C, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*h*w, C)
        idx = self.nearest(flat.detach())
        z_q = self.codebook(idx).view(B, h, w, C).permute(0, 3, 1, 2)  # (B, C, h, w)
        codebook_loss = F.mse_loss(z_q, z.detach())  # gradient to the codes only
        commitment_loss = F.mse_loss(z, z_q.detach())  # gradient to the encoder only
        z_st = z + (z_q - z).detach()  # straight-through: forward z_q, backward identity to z
        return QuantOut(z_st, idx.view(B, h, w), codebook_loss, commitment_loss,
                        codebook_loss + self.beta * commitment_loss)

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) long -> (B, C, h, w) codebook vectors."""
        return self.codebook(indices).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------ dead-code remedies (training only)

    @torch.no_grad()
    def kmeans_init(self, z: Tensor, iters: int, generator: torch.Generator) -> None:
        """Set the codebook to k-means centroids of the encoder outputs z (B, C, h, w); once per run."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()  # (N, C)
        centroids = _sample_rows(flat, self.n_codes, generator)
        for _ in range(iters):
            assign = torch.cdist(flat, centroids).argmin(1)  # (N,)
            sums = torch.zeros_like(centroids).index_add_(0, assign, flat)
            counts = torch.bincount(assign, minlength=self.n_codes).float()
            filled = counts > 0
            # an empty cluster keeps its centroid (a random data point): restarts handle it later
            centroids[filled] = sums[filled] / counts[filled, None]
        self.codebook.weight.copy_(centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update_usage(self, indices: Tensor, decay: float) -> None:
        """Running average of how many of a step's positions chose each code."""
        counts = torch.bincount(indices.flatten(), minlength=self.n_codes).float()
        self.usage.mul_(decay).add_(counts, alpha=1.0 - decay)

    @torch.no_grad()
    def restart_dead(self, z: Tensor, threshold: float, generator: torch.Generator) -> int:
        """Move codes with usage < threshold onto random encoder outputs of z (B, C, h, w); returns how many.
        A restarted code gets usage 1 again: a grace period before it can be judged dead a second time."""
        dead = (self.usage < threshold).nonzero().flatten()
        if len(dead) == 0:
            return 0
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        self.codebook.weight[dead] = _sample_rows(flat, len(dead), generator).to(self.codebook.weight.dtype)
        self.usage[dead] = 1.0
        return len(dead)


def _sample_rows(flat: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n rows of flat (N, C); with replacement and a little noise when N < n, so no two codes coincide."""
    N = flat.shape[0]
    if N >= n:
        return flat[torch.randperm(N, generator=generator).to(flat.device)[:n]].clone()
    rows = flat[torch.randint(N, (n,), generator=generator).to(flat.device)]
    noise = torch.randn(rows.shape, generator=generator).to(flat.device) * (flat.std() * 0.01 + 1e-6)
    return rows + noise


def code_stats(counts: Tensor) -> dict[str, float]:
    """Codebook usage (fraction of codes chosen at least once) and perplexity exp(H(p)) of a histogram (K,)."""
    counts = counts.double()
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": float(math.exp(entropy)),
            "codes_used": int((counts > 0).sum())}
