"""`make demo`: train the embedded default, then show what one model does with text and images.

    python -m transfusion.demo --config configs/tiny.toml --out runs/demo
    python -m transfusion.demo --config configs/demo_latent.toml --vae-config configs/vae/fashion_kl_demo.toml \
        --out runs/demo_latent      # `make demo-latent`: trains the KL-VAE that data.vae names first

Writes into OUT: the run (checkpoints/, metrics.jsonl, loss_curve.png), `grid.png` (the dataset's prompt grid:
for colour fashion every item in every colour, held-out combinations framed in red), `captions.png` + captions
in summary.json (real test images -> text),
`shakespeare.txt` (a text continuation) and `summary.json` (timings, losses, scores). Rerunning resumes the
finished run instead of training again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from transfusion import config as config_mod
from transfusion.autoencoder.codec import image_codec
from transfusion.data import fashion
from transfusion.data.registry import get_dataset
from transfusion.log import log
from transfusion.metrics import add_labels, make_grid, read_metrics, save_png

HELDOUT_BORDER = (255, 0, 0)
SHAKESPEARE_PROMPT = "DUNCAN:\nWhat news, my lord?\n\nMACBETH:\n"


def draw_grid(model: Any, tokenizer: Any, cfg: config_mod.Config, out: Path, seed: int) -> dict[str, Any]:
    """The dataset's prompt grid, one sample per cell, sampled with the config's [diffusion] settings."""
    from transfusion.diffusion import build_schedule
    from transfusion.decoding import generate_images, sampling_args

    grid_spec = get_dataset(cfg.data).prompt_grid()
    if grid_spec is None:
        return {}
    sampling = sampling_args(cfg.diffusion)
    t0 = time.perf_counter()
    with torch.no_grad():
        images = generate_images(
            model, tokenizer, grid_spec.prompts, build_schedule(cfg.diffusion),
            generator=torch.Generator().manual_seed(seed), progress=True, codec=image_codec(cfg), **sampling,
        ).float().cpu()
    wall = time.perf_counter() - t0
    borders = [HELDOUT_BORDER if m else None for m in grid_spec.marked] if grid_spec.marked else None
    scale, pad = 3, 2
    grid = make_grid(images, nrow=grid_spec.ncols, scale=scale, pad=pad, borders=borders)
    px = images.shape[-1]  # pixels per side (a latent model's images come back decoded)
    cell = (px * scale + 2 * pad, px * scale + 2 * pad)
    save_png(add_labels(grid, grid_spec.row_labels, grid_spec.col_labels, cell), out / "grid.png")
    result: dict[str, Any] = {"prompts": len(grid_spec.prompts), "sample_wall_s": round(wall, 1),
                              "sampler": f"{sampling['sampler']} {sampling['steps']} steps, CFG {sampling['cfg_scale']}"}
    if cfg.data.dataset == "colour_fashion":
        combos = [(i, c) for i in range(len(fashion.ITEMS)) for c in range(len(fashion.COLOUR_NAMES))]
        result.update(_colour_scores(images, combos))
    return result


def _colour_scores(images: torch.Tensor, combos: list[tuple[int, int]]) -> dict[str, Any]:
    """Exact colour read-back of the generated images (evaluation suite's detector), when available."""
    try:
        from transfusion.evaluate.alignment import read_colours
    except ImportError:
        return {}
    pred, _ = read_colours(images)
    want = torch.tensor([c for _, c in combos])
    held = torch.tensor([combo in fashion.HELDOUT for combo in combos])
    ok = pred == want
    return {"colour_correct": round(float(ok.float().mean()), 3),
            "colour_correct_heldout": round(float(ok[held].float().mean()), 3)}


def caption_real(model: Any, tokenizer: Any, cfg: config_mod.Config, out: Path, n: int = 16) -> dict[str, Any]:
    """Caption real test images of the dataset; for colour fashion, report how many name item and colour."""
    from transfusion.decoding import caption_images

    codec = image_codec(cfg)
    ex = get_dataset(cfg.data).examples("test", n, seed=0, image_size=codec.pixel_size)
    if ex is None:
        return {"examples": []}
    with torch.no_grad():
        captions = caption_images(model, tokenizer, ex.images, codec=codec)
    save_png(make_grid(ex.images, nrow=8, scale=3), out / "captions.png")
    rows = [{"truth": t, "caption": c} for t, c in zip(ex.captions, captions)]
    result: dict[str, Any] = {"examples": rows}
    if {"item", "colour"} <= set(ex.labels):
        from transfusion.evaluate.cider import parse_caption

        parsed = [parse_caption(c) for c in captions]
        both = [p == (int(i), int(c)) for p, i, c in zip(parsed, ex.labels["item"], ex.labels["colour"])]
        result["item_and_colour_right"] = round(sum(both) / len(both), 3)
    return result


def continue_text(model: Any, tokenizer: Any, cfg: config_mod.Config, out: Path) -> str:
    from transfusion.diffusion import build_schedule
    from transfusion.decoding import generate

    with torch.no_grad():
        parts = generate(model, tokenizer, SHAKESPEARE_PROMPT, build_schedule(cfg.diffusion),
                         max_new_tokens=96, max_images=0, progress=False)
    text = SHAKESPEARE_PROMPT + "".join(p for p in parts if isinstance(p, str))
    (out / "shakespeare.txt").write_text(text + "\n")
    return text


def train_autoencoder(vae_config: str, cfg: config_mod.Config) -> dict[str, Any]:
    """Train the autoencoder `vae_config` into the run directory the demo's `data.vae` names, unless a finished
    run is there (its last checkpoint is at the config's step count): a rerun, like the transformer's, reuses it."""
    from transfusion.autoencoder import config as ae_config
    from transfusion.autoencoder.train import train_vae
    from transfusion.checkpoint import find_latest

    if not cfg.data.vae:
        raise config_mod.ConfigError(f"--vae-config {vae_config}: the demo config names no data.vae to train it into")
    vcfg = ae_config.load(vae_config)
    out = Path(cfg.data.vae)
    latest = find_latest(out)
    if latest is not None and latest.resolve().name == f"step_{vcfg.train.steps:08d}":
        log.info(f"demo: autoencoder {out} is trained ({latest.resolve().name}); reusing it")
        return {"run": str(out), "reused": True}
    t0 = time.perf_counter()
    log.info(f"demo: training the autoencoder {vae_config} -> {out} ...")
    summary = train_vae(vcfg, out, resume=latest is not None)
    return {"run": str(out), "reused": False, "wall_s": round(time.perf_counter() - t0, 1),
            "steps": summary["steps"], "train_s": summary["train_s"]}


def run_demo(config_path: str, out: Path, overrides: list[str], vae_config: str | None = None) -> dict[str, Any]:
    from transfusion.backends import setup_process
    from transfusion.checkpoint import find_latest
    from transfusion.inference import load
    from transfusion.train import train

    t0 = time.perf_counter()
    cfg = config_mod.load(config_path, overrides)
    autoencoder = train_autoencoder(vae_config, cfg) if vae_config else None
    source = get_dataset(cfg.data).describe()
    log.info(f"demo: data = {source}")
    train_summary = train(cfg, out, resume=find_latest(out) is not None)  # a rerun reuses the finished run
    t_train = time.perf_counter() - t0

    loaded = load(out, use_ema=True)
    setup_process(loaded.config.runtime)
    model, tokenizer, cfg, ckpt = loaded.model, loaded.tokenizer, loaded.config, loaded.path
    log.info("demo: drawing the prompt grid ...")
    grid = draw_grid(model, tokenizer, cfg, out, seed=cfg.train.seed)
    log.info("demo: captioning real test images ...")
    captions = caption_real(model, tokenizer, cfg, out)
    text = continue_text(model, tokenizer, cfg, out)
    recs = [r for r in read_metrics(out / "metrics.jsonl") if isinstance(r.get("tokens_per_s"), (int, float))]
    rates = [r["tokens_per_s"] for r in recs[1:]] or [0.0]  # the first window includes warm-up
    summary = {
        "config": config_path,
        "data": source,
        "checkpoint": str(ckpt),
        "autoencoder": autoencoder,
        "train": train_summary,
        "train_tokens_per_s_median": sorted(rates)[len(rates) // 2],
        "train_wall_s": round(t_train, 1),
        "grid": {"file": "grid.png", "heldout_marked": "red frame", **grid},
        "captions": {"file": "captions.png", **captions},
        "shakespeare": text,
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--vae-config", default=None, metavar="VAE.toml",
                   help="train this autoencoder into the config's data.vae first (the latent demo)")
    args = p.parse_args(argv)
    from transfusion.cli import _known_errors

    try:
        s = run_demo(args.config, Path(args.out), args.set, args.vae_config)
    except _known_errors() as e:
        log.error(str(e))
        return 2
    print(f"\ndemo done in {s['total_wall_s']:.0f} s (training {s['train_wall_s']:.0f} s, "
          f"{s['train_tokens_per_s_median']:,.0f} tokens/s)")
    if s["autoencoder"] and not s["autoencoder"]["reused"]:
        print(f"  of which the autoencoder {s['autoencoder']['run']}: {s['autoencoder']['wall_s']:.0f} s")
    for name in ("grid.png", "captions.png", "loss_curve.png", "shakespeare.txt", "summary.json"):
        print(f"  {Path(args.out) / name}")
    for row in s["captions"]["examples"][:4]:
        print(f"  caption: {row['caption']!r}  (truth: {row['truth']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
