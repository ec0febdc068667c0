"""Is training on cached VAE latents as fast as training on pixels of the same sequence length? (issue 14)

    python benchmarks/latent_speed.py [--steps 30] [--rounds 3] [--threads 2] [--out results/latent_speed.json]

Two configs with 64 image positions each and the same transformer (dim 256, 8 layers), batch and text mix:
  pixels   configs/emoji.toml         32x32x3 pixels in 4x4 patches (48 values per patch)
  latents  configs/emoji_latent.toml  64x64 images through the KL-VAE -> 16x16x4 latents in 2x2 patches (16 values),
                                      read from the latent cache (computed once before the first timed round)
Each round trains both for `--steps` steps through `transfusion train` (alternating which goes first, so a
neighbour's load falls on both); the step time is the median of metrics.jsonl's per-step `train_s` deltas after
the first 5 steps (warm-up, allocator). Reported: median over rounds per side and the ratio latents / pixels
(<= 1: latents are not slower). The VAE's own training is not counted (it is done once, like the cache).
Needs `make data` (emoji) and the KL-VAE run named in configs/emoji_latent.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transfusion.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"pixels": ROOT / "configs" / "emoji.toml", "latents": ROOT / "configs" / "emoji_latent.toml"}
WARMUP = 5


def step_time(config: Path, steps: int, threads: int, out: Path) -> float:
    """Median seconds per optimiser step of a fresh `transfusion train` run of `steps` steps."""
    sets = [f"train.steps={steps}", "train.log_every=1", "train.ckpt_every=0", "train.sample_n=0",
            "train.sample_every=0", "train.time_limit_min=0", "train.tensorboard=false", f"runtime.threads={threads}"]
    cmd = [sys.executable, "-m", "transfusion.cli", "train", str(config), "--out", str(out), "--no-progress",
           *(x for s in sets for x in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {config.name} failed:\n{proc.stderr[-2000:]}")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train_s" in r and "loss" in r]
    times = [b["train_s"] - a["train_s"] for a, b in zip(rows, rows[1:]) if a["step"] >= WARMUP]
    if not times:
        raise SystemExit(f"error: {config.name}: no step times in {out}/metrics.jsonl")
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latent_speed.json"))
    args = ap.parse_args()
    per: dict[str, list[float]] = {k: [] for k in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        step_time(SIDES["latents"], WARMUP + 2, args.threads, Path(tmp) / "fill_cache")  # cache exists after this
        for r in range(args.rounds):
            order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
            for side in order:
                per[side].append(step_time(SIDES[side], args.steps, args.threads, Path(tmp) / f"{side}{r}"))
                print(f"round {r + 1}/{args.rounds} {side}: {per[side][-1]:.3f} s/step", flush=True)
    med = {k: statistics.median(v) for k, v in per.items()}
    result = {
        "what": "s/step, same transformer and 64 image positions: 32px pixels (4x4 patches) vs cached f=4 latents "
                "(2x2 patches of 16x16x4)",
        "pixels_s_per_step": med["pixels"], "latents_s_per_step": med["latents"],
        "latents_over_pixels": med["latents"] / med["pixels"],
        "rounds": per, "steps": args.steps, "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "note": "shared machine: the ratio (both sides alternated in one run) is the figure, not absolute times",
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("pixels_s_per_step", "latents_s_per_step", "latents_over_pixels")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
