"""A/B of the CPU fp32 fast path (src/transfusion/backends/cpu/onednn.py) against plain PyTorch, in one process.

    .venv/bin/python benchmarks/onednn_ab.py --out benchmarks/results/onednn_ab.json     # ~3 min, 2 threads

Interleaved rounds (A B, then B A, ...) on the C1 model of `make bench`; medians and the ratio plain / fast:
- `matmul`: the model's four Linear shapes at several row counts, MKL `F.linear` vs oneDNN with packed weights;
- `sample`: caption -> image, DDIM 30 steps, CFG 3 (`generate_images`, as `make bench`), with the fast path
  off (TRANSFUSION_ONEDNN=0), with packed Linears only, and with the fused Block forward too;
- `train`: one fp32 training step (forward + backward + fused AdamW), oneDNN off vs on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import C1, QUICK, set_threads  # noqa: E402
from ours import BenchTokenizer, build_model, make_step, train_batch  # noqa: E402
from transfusion.config import RuntimeConfig  # noqa: E402
from transfusion.diffusion.schedule import NoiseSchedule  # noqa: E402
from transfusion.decoding import generate_images  # noqa: E402
from transfusion.backends.cpu import onednn  # noqa: E402
from transfusion.backends.cpu.runtime import tune_malloc  # noqa: E402


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, reps: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant, alternating their order every round."""
    names = list(variants)
    for name in names:  # warm-up
        variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(reps):
                variants[name]()
            times[name].append((time.perf_counter() - t0) / reps)
    return {n: median(v) for n, v in times.items()}


def ab_matmul(w, rows: list[int], rounds: int) -> dict[str, Any]:
    shapes = [(w.dim, 3 * w.dim), (w.dim, w.dim), (w.dim, 2 * w.ffn_hidden), (w.ffn_hidden, w.dim)]
    weights = [torch.randn(n, k) for k, n in shapes]
    out = {}
    for m in rows:
        xs = [torch.randn(m, k) for k, _ in shapes]
        packed = [torch.ops.mkldnn._reorder_linear_weight(wt, 512) for wt in weights]
        reps = max(1, 2000 // m)
        t = interleaved({
            "mkl": lambda: [F.linear(x, wt) for x, wt in zip(xs, weights)],
            "onednn_packed": lambda: [onednn._matmul(x, p) for x, p in zip(xs, packed)],
        }, rounds, reps)
        out[f"rows_{m}"] = dict(**{k: v * 1e3 for k, v in t.items()}, unit="ms for the 4 shapes",
                                speedup=t["mkl"] / t["onednn_packed"])
    return out


def ab_sample(w, rounds: int) -> dict[str, Any]:
    model = build_model(w, runtime=RuntimeConfig(onednn=False)).eval()  # math attention; oneDNN per mode
    tok = BenchTokenizer(w.prefix_tokens - 2, w.vocab_size)
    schedule = NoiseSchedule(1000)
    real_block = onednn.Block

    def run(mode: str) -> Callable[[], Any]:
        class _NoBlock:  # hides the Block class from onednn_linears: packed Linears without the fused forward
            pass

        def call() -> Any:
            onednn.Block = real_block if mode == "fused_blocks" else _NoBlock  # type: ignore[misc]
            try:
                with onednn.packed_linears(model, enabled=mode != "off"):
                    return generate_images(model, tok, ["caption"], schedule, steps=w.sample_evals,
                                           cfg_scale=w.cfg_scale, sampler="ddim",
                                           generator=torch.Generator().manual_seed(0), progress=False)
            finally:
                onednn.Block = real_block  # type: ignore[misc]

        return call

    t = interleaved({m: run(m) for m in ("off", "packed_linears", "fused_blocks")}, rounds)
    return dict(seconds=t, speedup_packed=t["off"] / t["packed_linears"], speedup_fused=t["off"] / t["fused_blocks"])


def ab_train(w, rounds: int) -> dict[str, Any]:
    batch = train_batch(w)
    steps = {}
    for name, on in (("off", False), ("on", True)):
        steps[name] = make_step(build_model(w, runtime=RuntimeConfig(onednn=on)).train(), batch, bf16=False)
    t = interleaved(steps, rounds)
    return dict(seconds=t, speedup=t["off"] / t["on"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    if not onednn.available():
        raise SystemExit("this torch build has no oneDNN linear; nothing to compare")
    set_threads(args.threads)
    tune_malloc()  # as the entry points do
    w = QUICK if args.quick else C1
    rows = [1, 32, 392] if args.quick else [1, 2, 32, 80, 392, 2424]
    result = dict(threads=torch.get_num_threads(), torch=torch.__version__, quick=args.quick,
                  matmul=ab_matmul(w, rows, args.rounds), sample=ab_sample(w, args.rounds),
                  train=ab_train(w, args.rounds))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
