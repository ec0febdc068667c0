"""Training FLOPs of the architecture, from the model config alone.

Two counts, for two uses:

1. `flops_per_token(mc, seq_len)`: PaLM's model-FLOPs convention (Chowdhery et al. 2022, App. B) for MFU.
   Forward + backward of every weight matrix is 6 FLOPs per weight per token; attention (QK^T and AV, dense,
   forward + backward) is 12 * n_layers * dim * seq_len. It leaves out the token embedding (a lookup) and the LM
   head (only text positions use it). The benchmarks use it (benchmarks/ours.py counts a step with
   FlopCounterMode and adds dense attention; gpu.sh's trainer-path MFU is 6 N): on workload C1 it gives 96.8
   MFLOP/token against the 97.8 that `benchmarks/ours.py flops` measures (-1.0%: the LM head on C1's text
   positions). Used for the trainer's MFU (train/mfu.py) and a release's training compute (checkpoint/release.py).

2. `StepFlops(mc)(tokens, rows, targets, images)`: the FLOPs of one training step, for comparing the two model
   families at equal compute (paper Fig. 5, Table 3's parity-FLOP ratio), logged cumulatively as `flops` in
   metrics.jsonl. Here the parts each family uses differently are counted where they run:
       transformer blocks   6 * N_blocks * tokens                 every position, both families
       attention            12 * n_layers * dim * seq_len * tokens  dense: what SDPA / the math kernel compute
       LM head              6 * dim * V * targets                 Transfusion: text targets; Chameleon: text +
                                                                  image-code targets (V = text vocab + codebook)
       patch encoder+decoder 3 * forward FLOPs of one image * images   (Transfusion: linear or U-Net, measured
                                                                  once by FlopCounterMode)
   "3 * forward" is forward + backward (the backward of a matmul is two matmuls of the same size). The
   counter agrees within 2% on micro models of both families (tests/test_flops.py); the small excess is the
   input-gradient matmul of layers whose input needs no gradient (the first patch layer).
"""

from __future__ import annotations

import torch

from transfusion.config import Family, ModelConfig
from transfusion.model.build import build_model


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of rows `seq_len` long (convention 1 above)."""
    model = build_model(mc, device="meta")  # parameter shapes only: no memory, no init
    skip = {"tok_emb.weight", "lm_head.weight"}
    n = sum(p.numel() for name, p in model.named_parameters() if name not in skip)
    return 6.0 * n + 12.0 * mc.n_layers * mc.dim * seq_len


def _patch_forward_flops(mc: ModelConfig) -> float:
    """Forward FLOPs of the patch encoder + decoder on one image, counted by FlopCounterMode. On the CPU, not the
    meta device: the encoder branches on the values of t (one timestep embedding per image, not per patch); the
    patch layers alone are small (a few MB even for the 7B config), and their values do not matter here."""
    from torch.utils.flop_counter import FlopCounterMode

    from transfusion.model.patch import build_patch_encoder

    n = mc.patches_per_image
    with torch.random.fork_rng(devices=[]):  # the layers' default init must not move the caller's RNG
        patch = build_patch_encoder(mc)
    x, t, h_out = torch.zeros(n, mc.patch_dim), torch.zeros(n, dtype=torch.long), torch.zeros(n, mc.dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        _, ctx = patch.encode(x, t)
        patch.decode(h_out, ctx)
    return float(counter.get_total_flops())


class StepFlops:
    """FLOPs of one training step from the config and the step's counts (convention 2 above)."""

    def __init__(self, mc: ModelConfig):
        model = build_model(mc, device="meta")
        self.mc = mc
        self.block_params = sum(p.numel() for p in model.layers.parameters())
        self.head_params = model.lm_head.weight.numel()  # dim * (vocab [+ codebook])
        self.patch_fwd = 0.0 if mc.family == Family.CHAMELEON else _patch_forward_flops(mc)

    def __call__(self, tokens: int, seq_len: int, targets: int, images: int) -> float:
        """tokens: positions run (rows * seq_len); targets: LM targets (logits computed); images: images encoded."""
        mc = self.mc
        blocks = 6.0 * self.block_params * tokens
        attention = 12.0 * mc.n_layers * mc.dim * seq_len * tokens
        head = 6.0 * self.head_params * targets
        patch = 3.0 * self.patch_fwd * images
        return blocks + attention + head + patch
