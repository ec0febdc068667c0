"""The peak FLOP/s of the hardware and MFU (model FLOPs utilisation) of the trainer's logged throughput:

    mfu = flops_per_token * tokens_per_s / (peak_flops_per_rank * world_size)

FLOPs per token: model/flops.py (PaLM's model-FLOPs convention, the benchmarks' too).

Peak FLOP/s, per rank, in this order:
1. `train.peak_tflops` when > 0 (your measurement or datasheet);
2. CUDA: the datasheet dense rate of known GPUs (`GPU_PEAK_TFLOPS`: bf16 tensor cores under `train.bf16`, plain
   fp32 otherwise: the project leaves TF32 off);
3. CPU: this project's measured matmul peak, DESIGN.md §4 (2 threads: fp32 185, bf16 400 GFLOP/s), per thread
   times torch's intra-op threads. It is a measurement of one machine (AVX-512 with BF16, no AMX), so on another
   CPU the MFU is an estimate: set train.peak_tflops to `benchmarks/common.matmul_peak_gflops` there;
4. otherwise unknown: mfu is None (null in metrics.jsonl).
"""

from __future__ import annotations

import re

import torch

from transfusion.config import Config
from transfusion.model.flops import flops_per_token

# (model in torch.cuda.get_device_name(), as whole words, dense bf16 TFLOP/s, fp32 TFLOP/s) from NVIDIA's
# datasheets; more specific names first (an "H100 PCIe" also contains "H100"). Whole words keep an "A10G" (a
# different chip) from reading as an "A10"
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.0, 82.6),
)
# DESIGN.md §4: matmul peak measured on this project's 2-thread CPU machine, per thread
CPU_GFLOPS_PER_THREAD = {"fp32": 185.0 / 2, "bf16": 400.0 / 2}


def peak_flops(cfg: Config, device: torch.device | str) -> tuple[float | None, str]:
    """(peak FLOP/s of one rank, where the number comes from) for this run's dtype; (None, why) when unknown."""
    tc, device = cfg.train, torch.device(device)
    dtype = "bf16" if tc.bf16 else "fp32"
    if tc.peak_tflops > 0:
        return tc.peak_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for model, bf16, fp32 in GPU_PEAK_TFLOPS:
            if re.search(rf"\b{re.escape(model)}\b", name):
                return (bf16 if tc.bf16 else fp32) * 1e12, f"{name} datasheet, dense {dtype}"
        return None, f"{name} is not in transfusion.train.mfu.GPU_PEAK_TFLOPS; set train.peak_tflops"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return (CPU_GFLOPS_PER_THREAD[dtype] * threads * 1e9,
                f"CPU {dtype} matmul peak measured in DESIGN.md §4, {CPU_GFLOPS_PER_THREAD[dtype]:.1f} GFLOP/s "
                f"per thread x {threads}")
    return None, f"no peak known for device {device.type}; set train.peak_tflops"


class MFU:
    """MFU of a run's logged throughput: `mfu(tokens_per_s)` (None when the peak is unknown)."""

    def __init__(self, cfg: Config, device: torch.device | str, world_size: int):
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        peak, self.source = peak_flops(cfg, device)
        self.peak = None if peak is None else peak * world_size  # tokens/s is global: so is the peak

    def __call__(self, tokens_per_s: float) -> float | None:
        if self.peak is None:
            return None
        return round(self.flops_per_token * tokens_per_s / self.peak, 4)
