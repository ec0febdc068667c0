"""Where a trained model's diffusion prediction goes wrong, by noise level: the diagnostic behind docs/quality.md.

    python benchmarks/eps_diagnostics.py RUN [RUN ...] [--n 64] [--out FILE.json]

For real colour-fashion test images noised at t in {0, 100, ..., 999}, with their captions (conditional) and
without (the CFG twin's context): the MSE of the network's eps estimate (its output turned into eps, so eps- and
v-runs compare), the MSE of the trivial estimate eps = x_t / sqrt(1 - abar) (a pure copy; at high t it is the
right answer up to the image's own contribution), and the x0 error that DDIM's x0 estimate inherits
(eps MSE x (1 - abar) / abar). One JSON object per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import image_documents, real_test_patches  # noqa: E402

T_GRID = [0, 100, 300, 500, 700, 800, 900, 950, 990, 999]


@torch.no_grad()
def diagnose(run: str, n: int, use_ema: bool) -> dict:
    m, ex, schedule, x0 = real_test_patches(run, n, use_ema=use_ema)  # x0 (N, P, D)
    model, cfg, tk = m.model, m.config, m.tokenizer
    N, P, D = x0.shape
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    out: dict = {"run": run, "ema": use_ema, "prediction": cfg.diffusion.prediction.value, "by_t": {}}
    for cond in (True, False):
        rows = [[tk.bos_id] + (tk.encode(cap) if cond else []) + [tk.boi_id] for cap in ex.captions]
        tokens, image_ids, doc_ids, positions, _ = image_documents(rows, [[] for _ in rows], P, tk.pad_id)
        for t_val in T_GRID:
            t = torch.full((N * P,), t_val, dtype=torch.long)
            x_t = schedule.add_noise(x0.reshape(-1, D), eps.reshape(-1, D), t)
            pred = model(tokens, image_ids, doc_ids, positions, x_t, t).diffusion.float()
            eps_hat = schedule.to_eps(x_t, pred, t)
            a = float(schedule.alphas_cumprod[t_val])
            mse = float((eps_hat - eps.reshape(-1, D)).pow(2).mean())
            copy = float((x_t / (1 - a) ** 0.5 - eps.reshape(-1, D)).pow(2).mean()) if a < 1 else None
            key = f"{'cond' if cond else 'uncond'}_t{t_val}"
            out["by_t"][key] = {"eps_mse": mse, "copy_mse": copy, "x0_mse_ddim": mse * (1 - a) / max(a, 1e-12)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = [diagnose(r, args.n, not args.no_ema) for r in args.runs]
    for r in results:
        print(r["run"], r["prediction"])
        for t in T_GRID:
            c, u = r["by_t"][f"cond_t{t}"], r["by_t"][f"uncond_t{t}"]
            copy = f"{c['copy_mse']:.4f}" if c["copy_mse"] is not None else "-"
            print(f"  t={t:4d}  eps mse cond {c['eps_mse']:.4f} uncond {u['eps_mse']:.4f}  copy {copy}  "
                  f"x0 err (ddim) {c['x0_mse_ddim']:.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
