"""Kernels and process settings, applied from outside the model (torchtitan calls these model converters).

    setup_process(cfg.runtime)                          once per process: threads, allocator
    convert_model(model, cfg.runtime, inference=True)   once per model, after its weights are in place

The model package never imports this one: a converter swaps in a faster implementation of the same
computation (`Attention.dense_kernel`, Linear / Block forwards) on an existing model, and every converter has an
equivalence test against the plain model (tests/test_onednn.py, tests/test_masks.py). Which converters run is
the [runtime] section of the config; nothing is steered by environment variables.

| converter | where it applies | what it swaps | [runtime] key |
|---|---|---|---|
| `cpu.attention.use_math_attention` | CPU | attention kernel: explicit math where faster than SDPA | math_attention |
| `cpu.onednn.install(pack=False)` | CPU fp32 training, not FSDP or compile | Linear forwards + input grads in oneDNN | onednn |
| `cpu.onednn.install(pack=True)` | CPU inference | Linears on packed weights, fused Block forward | onednn |
"""

from __future__ import annotations

import torch.nn as nn

from transfusion.backends.cpu import attention as cpu_attention
from transfusion.backends.cpu import onednn as cpu_onednn
from transfusion.backends.cpu.runtime import set_threads, tune_malloc
from transfusion.config import RuntimeConfig


def setup_process(rc: RuntimeConfig) -> None:
    """Process-wide settings: intra-op threads and the glibc allocator tuning."""
    set_threads(rc.threads)
    if rc.tune_malloc:
        tune_malloc()


def convert_model(model: nn.Module, rc: RuntimeConfig, inference: bool, compiled: bool = False) -> list[str]:
    """Apply the converters `rc` enables to a model whose weights are in place; returns their names.

    `inference=True` packs weights for a model that will not be trained (the packed path still checks each
    weight's version and falls back if one changes). Under torch.compile oneDNN stays off (Dynamo would trace
    into the swapped forwards)."""
    device = next(model.parameters()).device
    applied: list[str] = []
    if device.type != "cpu":
        return applied
    if rc.math_attention and cpu_attention.use_math_attention(model):
        applied.append("cpu_math_attention")
    if rc.onednn and not compiled and cpu_onednn.install(model, pack=inference):
        applied.append("onednn_packed" if inference else "onednn")
    return applied
