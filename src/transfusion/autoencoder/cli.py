"""The autoencoder verbs of the `transfusion` command line: `train-vae` and `eval-vae` (wired in cli.py)."""

from __future__ import annotations

import argparse
import json


def cmd_train_vae(args: argparse.Namespace) -> int:
    from transfusion.autoencoder import config as ae_config
    from transfusion.autoencoder.train import train_vae

    cfg = ae_config.load(args.config, args.set)
    summary = train_vae(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_eval_vae(args: argparse.Namespace) -> int:
    from transfusion.autoencoder.evaluate import evaluate_vae, write_report
    from transfusion.config import ConfigError

    for name in ("n", "fid_n"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    report = evaluate_vae(args.ckpt, n=args.n, fid_n=args.fid_n, batch_size=args.batch_size)
    if args.out:
        write_report(report, args.out)
    print(json.dumps(report, indent=1))
    return 0


def add_verbs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-vae", help="train a KL-VAE or VQ-VAE image autoencoder (configs/vae/*.toml)")
    p.add_argument("config", help="TOML config, e.g. configs/vae/emoji_kl.toml")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, recon/*.png)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=100")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("eval-vae", help="PSNR, SSIM, rFID (and codebook use) of an autoencoder on its test split")
    p.add_argument("--ckpt", required=True, help="autoencoder run directory (latest checkpoint) or step directory")
    p.add_argument("--out", default="", help="also write the JSON report here")
    p.add_argument("--n", type=int, default=0, help="test images to reconstruct (0: all)")
    p.add_argument("--fid-n", type=int, default=250,
                   help="images for rFID (0: skip; Inception costs ~0.3 s/image per side on a CPU)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_eval_vae)
