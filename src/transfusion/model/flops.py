"""Training FLOPs per token of the architecture: PaLM's model-FLOPs convention (Chowdhery et al. 2022, App. B).

Forward + backward of every weight matrix is 6 FLOPs per weight per token; attention (QK^T and AV, dense, forward
+ backward) is 12 * n_layers * dim * seq_len. The count leaves out the token embedding (a lookup, no FLOPs) and
the LM head (only text positions use it). It is the convention the benchmarks use (benchmarks/ours.py counts a
step with FlopCounterMode and adds dense attention; gpu.sh's trainer-path MFU is 6 N): on the benchmark workload
C1 it gives 96.8 MFLOP/token against the 97.8 that `benchmarks/ours.py flops` measures (-1.0%: the LM head on
C1's text positions). Used for the trainer's MFU (train/mfu.py) and a release's training compute
(checkpoint/release.py).
"""

from __future__ import annotations

from transfusion.config import ModelConfig
from transfusion.model.build import build_model


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of rows `seq_len` long (module docstring)."""
    model = build_model(mc, device="meta")  # parameter shapes only: no memory, no init
    skip = {"tok_emb.weight", "lm_head.weight"}
    n = sum(p.numel() for name, p in model.named_parameters() if name not in skip)
    return 6.0 * n + 12.0 * mc.n_layers * mc.dim * seq_len
