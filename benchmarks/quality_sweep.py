"""Sample quality per config variant at a fixed step budget: train each variant, then score text -> image
alignment of its samples (item / colour / both, seen and held-out) with the evaluation suite's exact scorers.

    python benchmarks/quality_sweep.py --config configs/tiny.toml --out runs/sweep \\
        --variant base= --variant unet=model.patch_encoder=unet,model.unet_width=32 [--steps 720] [--n 160]

Each variant is `NAME=key=value,key=value` (config overrides; empty = the config as is). Writes
OUT/sweep.json (one record per variant: alignment of EMA and raw weights, final losses, train seconds) and
OUT/NAME_grid.png. Runs on whatever `train.device` resolves to (a GPU when there is one), so a quality question
that costs an hour of CPU can be answered in minutes; step for step the result is the CPU demo's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from transfusion import config as config_mod
from transfusion.evaluate.alignment import score_alignment
from transfusion.evaluate.classifier import get_classifier
from transfusion.evaluate.reference import eval_prompts
from transfusion.evaluate.report import generate_for_prompts
from transfusion.inference import load
from transfusion.metrics import read_metrics, save_image_grid
from transfusion.train import train


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, _, rest = spec.partition("=")
    if not name:
        raise SystemExit(f"--variant {spec!r}: expected NAME=key=value,key=value")
    return name, [kv for kv in rest.split(",") if kv]


def score(run: Path, use_ema: bool, n: int, device: str, clf, grid: Path | None) -> dict:
    m = load(run, use_ema=use_ema, device=device)  # with the inference kernels, as `transfusion eval` runs
    model, cfg, tok = m.model, m.config, m.tokenizer
    items, colours = eval_prompts(n, seed=0, heldout_share=0.25)
    d = cfg.diffusion
    images = generate_for_prompts(model, tok, cfg, items, colours, d.sample_steps, d.cfg_scale,
                                  d.sampler.value, seed=0, batch=max(16, n), progress=False).cpu()
    if grid is not None:
        save_image_grid(images[:64], grid, nrow=8, scale=2)
    return score_alignment(images, items, colours, clf).summary()


def _num_params(cfg: config_mod.Config) -> int:
    from transfusion.model.build import build_model

    return build_model(cfg.model, device="meta").num_params()  # counted without allocating or reading again


def run_variant(config: str, name: str, overrides: list[str], out: Path, steps: int | None, n: int,
                device: str, clf) -> dict:
    """Train one variant into out/name, then score its samples (raw weights, and the EMA when there is one)."""
    # a fixed step budget, not a wall-clock one: the variants must see the same data (time_limit_min off)
    extra = [f"train.device={device}", "train.sample_every=0", "train.time_limit_min=0"]
    extra += [f"train.steps={steps}"] if steps else []
    cfg = config_mod.load(config, overrides + extra)
    t0 = time.time()
    train(cfg, out / name, progress=False)
    train_s = time.time() - t0
    last = read_metrics(out / name / "metrics.jsonl")[-1]
    dev = "cuda" if torch.cuda.is_available() and device in ("auto", "cuda") else "cpu"
    return dict(
        name=name, overrides=overrides, steps=cfg.train.steps, train_s=round(train_s, 1),
        params=_num_params(cfg),
        diffusion_loss=last.get("diffusion_loss"), lm_loss=last.get("lm_loss"),
        ema=score(out / name, True, n, dev, clf, out / f"{name}_grid.png") if cfg.train.ema else None,
        raw=score(out / name, False, n, dev, clf, out / f"{name}_raw_grid.png"),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--steps", type=int, default=None, help="override train.steps for every variant")
    p.add_argument("--n", type=int, default=160, help="images scored per variant")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clf = get_classifier()
    results = []
    for spec in args.variant:
        name, overrides = parse_variant(spec)
        rec = run_variant(args.config, name, overrides, out, args.steps, args.n, args.device, clf)
        results.append(rec)
        print(json.dumps(rec), flush=True)
        (out / "sweep.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
