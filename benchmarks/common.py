"""Shared pieces of the side-by-side benchmarks: the C1 workload, timers, peak memory, matmul peak, JSON I/O.

This module is imported both by our side (the project venv) and by the peer's side (`.venv-peer`, which has
torch but not our package), so it uses only the standard library and torch.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Workload:
    """Reference config C1 (issue 5) and its training batch: one row = caption, one image, text after it."""

    dim: int = 384
    n_layers: int = 8
    n_heads: int = 6
    head_dim: int = 64
    ffn_hidden: int = 1024
    vocab_size: int = 2048  # total embedding rows on both sides (the peer's text vocab + its special/meta ids)
    image_size: int = 28
    image_channels: int = 1
    patch_size: int = 2
    batch: int = 8
    caption_tokens: int = 60
    text_after_tokens: int = 43
    prefix_tokens: int = 68  # caption + specials before the image, for sampling/KV-cache
    sample_evals: int = 30  # ODE / sampler evaluations, each a cond + uncond pass (CFG)
    cfg_scale: float = 3.0

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 196

    @property
    def patch_dim(self) -> int:
        return self.image_channels * self.patch_size**2  # 4

    @property
    def row_tokens(self) -> int:
        """Nominal tokens per row, counted the same way for both: BOS cap BOI patches EOI text EOS."""
        return 1 + self.caption_tokens + 1 + self.patches + 1 + self.text_after_tokens + 1  # 303

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.row_tokens


C1 = Workload()
QUICK = Workload(dim=64, n_layers=2, n_heads=2, head_dim=32, ffn_hidden=128, vocab_size=256, image_size=8,
                 batch=2, caption_tokens=6, text_after_tokens=4, prefix_tokens=8, sample_evals=2)


def workload(quick: bool) -> Workload:
    return QUICK if quick else C1


def set_threads(threads: int) -> int:
    """Pin torch's intra-op pool; 0 keeps the default. Returns the thread count in use."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def peak_rss_mb() -> float:
    """High-water resident set size of this process (VmHWM), in MiB; a fresh subprocess per measurement."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource  # not Linux /proc: ru_maxrss is KiB on Linux, bytes on macOS

    scale = 1.0 / (1024.0 * 1024.0) if sys.platform == "darwin" else 1.0 / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Wall seconds of `iters` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 1.5) -> float:
    """Best observed rate of an n x n x n matmul in this dtype and the current thread count, GFLOP/s.

    Both CPU GEMM libraries in the torch wheel are tried, MKL (`torch.mm`) and oneDNN (the library our fp32
    fast path uses, src/transfusion/backends/cpu/onednn.py), and the faster one is the peak: oneDNN reaches ~15% more
    in fp32 here, so a peak from MKL alone would overstate every MFU."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    kernels = [lambda: torch.mm(a, b, out=c)]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for kernel in kernels:
        kernel()  # warm-up (packing, thread pool)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            kernel()
            dt = time.perf_counter() - t0
            best = max(best, 2.0 * n**3 / dt / 1e9)
    return best


def emit(result: dict[str, Any]) -> None:
    """Print one JSON object on the last stdout line; the orchestrator parses that line."""
    result.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    result.setdefault("threads", torch.get_num_threads())
    result.setdefault("torch", torch.__version__)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def parse_last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output:\n{stdout[-2000:]}")


def workload_dict(w: Workload) -> dict[str, Any]:
    d = asdict(w)
    d.update(patches=w.patches, patch_dim=w.patch_dim, row_tokens=w.row_tokens)
    return d


def quiet_env() -> dict[str, str]:
    """Environment for benchmark subprocesses: no progress bars or info logs on stderr."""
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("LOGURU_LEVEL", "WARNING")
    return env


def image_documents(before: list[list[int]], after: list[list[int]], n_patches: int, pad_id: int):
    """One document per row, `before + <image i> + after`, right-padded (padding = doc 0): the teacher-forced
    batch the diagnostic scripts feed the model. Returns (tokens, image_ids, doc_ids, positions) (B, L) each and
    `targets` (B, L) bool: the positions whose next token is one of `after`'s (the LM loss of the text after the
    image)."""
    B = len(before)
    L = max(len(a) + n_patches + len(b) for a, b in zip(before, after))
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    image_ids = torch.full((B, L), -1, dtype=torch.long)
    doc_ids = torch.zeros(B, L, dtype=torch.long)
    positions = torch.zeros(B, L, dtype=torch.long)
    targets = torch.zeros(B, L, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(before, after)):
        seq = a + [pad_id] * n_patches + b
        tokens[i, :len(seq)] = torch.tensor(seq)
        image_ids[i, len(a):len(a) + n_patches] = i
        doc_ids[i, :len(seq)] = 1
        positions[i, :len(seq)] = torch.arange(len(seq))
        targets[i, len(a) + n_patches:len(seq) - 1] = True
    return tokens, image_ids, doc_ids, positions, targets


def real_test_patches(run: str, n: int, use_ema: bool, check: bool = True):
    """What the diagnostic scripts start from: a run loaded (`transfusion.load`), its first n colour-fashion test
    examples at the model's image size, its noise schedule, and the images as patches x0 (n, P, D)."""
    from transfusion.data.colour_fashion import fashion_examples
    from transfusion.diffusion import build_schedule
    from transfusion.images import patchify
    from transfusion.inference import load

    m = load(run, use_ema=use_ema, check=check)
    ex = fashion_examples("test", n=n, seed=0, size=m.config.model.image_size, use_full_dataset=True)
    return m, ex, build_schedule(m.config.diffusion), patchify(ex.images, m.config.model.patch_size)
