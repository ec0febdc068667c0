"""`transfusion` command line: prepare, train, export, release, sample, caption, edit, generate, eval, shard,
tokenizer.

Errors a user can fix (bad config key, missing data, corrupt checkpoint, diverged run, bad image, a prompt longer
than the model's context, an out-of-range option) print one `error: ...` line and exit with status 2 — no
traceback. Set TRANSFUSION_DEBUG=1 (env.py) to get the traceback anyway.
Under torchrun (`torchrun --nproc_per_node=N -m transfusion.cli train ...`) every rank runs the same command;
rank 0 alone prints the summary and the error line (every rank hits the same user error, and exits 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from transfusion import config as config_mod
from transfusion import env
from transfusion.log import log


class CLIError(RuntimeError):
    """A problem with command-line input (e.g. an unreadable image)."""


def _known_errors() -> tuple[type[BaseException], ...]:
    """Error types that carry a user-facing message; imported lazily so `--help` stays fast."""
    from transfusion.batch import BatchError
    from transfusion.checkpoint import CheckpointError
    from transfusion.data.fashion import DatasetMissing
    from transfusion.data.folder import FolderDatasetError
    from transfusion.data.shards_reader import ShardError
    from transfusion.decoding import GenerationError
    from transfusion.images import ImageReadError
    from transfusion.train import TrainingDiverged

    errors: list[type[BaseException]] = [
        config_mod.ConfigError, CheckpointError, DatasetMissing, FolderDatasetError, TrainingDiverged, BatchError,
        CLIError, GenerationError, ImageReadError, ShardError,
    ]
    try:
        from transfusion.tokenizer import TokenizerError

        errors.append(TokenizerError)
    except ImportError:
        pass
    from transfusion.autoencoder.model import AutoencoderError

    errors.append(AutoencoderError)
    try:  # a checkpoint the chosen eval suite cannot score (e.g. an edit fine-tune under --suite fast)
        from transfusion.evaluate.report import EvalError

        errors.append(EvalError)
    except ImportError:
        pass
    return tuple(errors)


# ------------------------------------------------------------------------------------------ helpers


def _load(args: argparse.Namespace) -> Any:
    """The checkpoint of --ckpt through transfusion.inference.load, with its process settings applied."""
    from transfusion.backends import setup_process
    from transfusion.inference import load

    loaded = load(args.ckpt, use_ema=not args.no_ema)
    setup_process(loaded.config.runtime)
    return loaded


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise CLIError(f"{name} must be at least 1, got {value}")
    return value


def _save_images(images: torch.Tensor, path: Path, scale: int) -> None:
    from transfusion.metrics import save_image_grid

    save_image_grid(images.float().cpu(), path, nrow=min(8, images.shape[0]), scale=scale, pad=0 if len(images) == 1 else 2)


# ------------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    from transfusion.train import train

    cfg = config_mod.load(args.config, args.set)
    if args.init_from:  # recorded in the run's config.toml as train.init_from
        cfg.train.init_from = args.init_from
    summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if env.is_rank0():
        print(json.dumps(summary, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Training checkpoint (DCP shards, any world size) -> one model.safetensors (+ ema.safetensors) checkpoint."""
    from transfusion.checkpoint import export_from_dcp

    path = export_from_dcp(args.ckpt, args.out)
    print(f"wrote {path}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """A run's checkpoint -> a directory to publish as is: weights, config, tokenizer, model card (docs/release.md)."""
    from transfusion.checkpoint.release import make_release

    path = make_release(args.run, args.out, use_ema=not args.no_ema, eval_reports=args.eval)
    print(f"wrote {path} (model.safetensors, config.toml, tokenizer.json, manifest.json, README.md)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from transfusion.diffusion import build_schedule
    from transfusion.decoding import generate_images, sampling_args

    _positive("--n", args.n)
    m = _load(args)
    if m.config.model.family == config_mod.Family.CHAMELEON:  # codes sampled one by one (chameleon/decoding.py)
        from transfusion.chameleon.decoding import generate_images as chameleon_images
        from transfusion.chameleon.vq import load_vq

        with torch.no_grad(), _precision(m.model, args.precision):
            images = chameleon_images(m.model, m.tokenizer, load_vq(m.config), [args.prompt] * args.n,
                                      cfg_scale=m.config.diffusion.cfg_scale if args.cfg is None else args.cfg,
                                      generator=_generator(args.seed))
        _save_images(images, Path(args.out), args.scale)
        print(f"wrote {args.out} ({args.n} image{'s' if args.n > 1 else ''} for {args.prompt!r})")
        return 0
    sampling = sampling_args(m.config.diffusion, args.steps, args.cfg, args.sampler)
    with torch.no_grad(), _precision(m.model, args.precision):
        images = generate_images(m.model, m.tokenizer, [args.prompt] * args.n,
                                 build_schedule(m.config.diffusion), generator=_generator(args.seed),
                                 progress=True, codec=m.codec, **sampling)
    _save_images(images, Path(args.out), args.scale)
    print(f"wrote {args.out} ({args.n} image{'s' if args.n > 1 else ''} for {args.prompt!r})")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from transfusion.decoding import caption_images
    from transfusion.images import read_image

    _positive("--max-new-tokens", args.max_new_tokens)
    m = _load(args)
    c = m.config.model
    images = torch.stack([read_image(p, m.codec.pixel_size, 3 if m.config.data.vae else c.image_channels)
                          for p in args.image])
    with torch.no_grad(), _precision(m.model, args.precision):
        if c.family == config_mod.Family.CHAMELEON:  # the image as its codes (chameleon/decoding.py)
            from transfusion.chameleon.decoding import caption_images as chameleon_captions
            from transfusion.chameleon.vq import load_vq

            captions = chameleon_captions(m.model, m.tokenizer, load_vq(m.config), images,
                                          max_new_tokens=args.max_new_tokens)
        else:
            captions = caption_images(m.model, m.tokenizer, images, max_new_tokens=args.max_new_tokens,
                                      codec=m.codec)
    for path, text in zip(args.image, captions):
        print(text if len(args.image) == 1 else f"{path}\t{text}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """Image editing (paper §4.5): --image(s) + --instruction -> the edited image(s), a grid when several."""
    from transfusion.diffusion import build_schedule
    from transfusion.decoding import sampling_args
    from transfusion.editing import edit_images
    from transfusion.images import read_image

    if not args.instruction.strip():
        raise CLIError('--instruction is empty: say what to change, e.g. --instruction "make it red"')
    for path in args.image:  # before the model loads: a wrong path is the commonest mistake
        if not Path(path).is_file():
            raise CLIError(f"--image {path}: no such file")
    m = _load(args)
    c = m.config.model
    images = torch.stack([read_image(p, m.codec.pixel_size, 3 if m.config.data.vae else c.image_channels)
                          for p in args.image])
    sampling = sampling_args(m.config.diffusion, args.steps, args.cfg, args.sampler)
    with torch.no_grad(), _precision(m.model, args.precision):
        edited = edit_images(m.model, m.tokenizer, images, [args.instruction] * len(images),
                             build_schedule(m.config.diffusion), generator=_generator(args.seed), progress=True,
                             codec=m.codec, **sampling)
    _save_images(edited, Path(args.out), args.scale)
    print(f"wrote {args.out} ({len(images)} image{'s' if len(images) > 1 else ''} edited: {args.instruction!r})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Free generation for one or more --prompt values, decoded together (decoding.generate_batch); prompt i
    samples with seed --seed + i, so each output is the same as generating that prompt alone with that seed."""
    from transfusion.diffusion import build_schedule
    from transfusion.decoding import generate_batch, sampling_args

    _positive("--max-new-tokens", args.max_new_tokens)
    m = _load(args)
    out_dir = Path(args.out_dir)
    sampling = sampling_args(m.config.diffusion, args.steps, args.cfg)
    with torch.no_grad(), _precision(m.model, args.precision):
        docs = generate_batch(
            m.model, m.tokenizer, args.prompt, build_schedule(m.config.diffusion),
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            generators=[_generator(args.seed + i) for i in range(len(args.prompt))],
            min_new_tokens=args.min_new_tokens, codec=m.codec, **sampling,
        )
    for i, (prompt, parts) in enumerate(zip(args.prompt, docs)):
        stem = args.name if len(args.prompt) == 1 else f"{args.name}_{i:02d}"
        pieces, n_img = [prompt], 0
        for part in parts:
            if isinstance(part, torch.Tensor):
                path = out_dir / f"{stem}_{n_img:02d}.png"
                _save_images(part if part.dim() == 4 else part[None], path, args.scale)
                pieces.append(f"\n[image: {path}]\n")
                n_img += 1
            else:
                pieces.append(str(part))
        print(("" if len(args.prompt) == 1 else f"--- prompt {i + 1}\n") + "".join(pieces))
        if not n_img and not "".join(pieces[1:]).strip():
            log.info(f"note: the model ended the document after prompt {prompt!r} with no text but whitespace "
                     "(EOS); ask for text with --min-new-tokens 32, or sample with --temperature 0.8")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The web demo: a page and a JSON/PNG API on --host:--port (loopback unless asked otherwise)."""
    import importlib.util
    import socket

    missing = [m for m in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"the web demo needs {', '.join(missing)}: pip install -e '.[serve]' (make venv has it)")
    from transfusion.serve import ServeLimits, serve

    for name in ("max_queue", "port"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.max_upload_mb <= 0 or args.timeout <= 0:
        raise CLIError("--max-upload-mb and --timeout must be positive")
    try:  # before the model loads: a port in use is the commonest mistake
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port") from e
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.info(f"warning: serving on {args.host}, reachable from other machines; the demo has no authentication")
    limits = ServeLimits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                         max_queue=args.max_queue, timeout_s=args.timeout)
    serve(args.ckpt, args.host, args.port, limits, use_ema=not args.no_ema)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Report what the data pipeline will use: dataset location (or how to get it) and the tokenizer."""
    from transfusion.data.fashion import fashion_dir
    from transfusion.data.registry import get_dataset

    cfg = config_mod.load(args.config, args.set)
    print(f"dataset: {get_dataset(cfg.data).describe()}")
    root = fashion_dir()
    print(f"Fashion-MNIST: {root or 'not installed (sudo apt-get install dataset-fashion-mnist; or make data)'}")
    print(f"use_full_dataset = {cfg.data.use_full_dataset}")
    try:
        from transfusion.tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.data.tokenizer or None)
        print(f"tokenizer: {getattr(tok, 'source', '?')} ({tok.vocab_size} tokens; model.vocab_size "
              f"{cfg.model.vocab_size})")
    except ImportError:
        print("tokenizer: module not available")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    """A folder or JSONL of image-caption pairs -> tar shards + index.json + report.json (docs/data.md)."""
    from transfusion.data.shards_writer import ShardOptions, write_shards

    opts = ShardOptions(args.image_size, args.shard_size, args.val_fraction, args.max_caption_tokens, args.tokenizer)
    report = write_shards(args.source, args.out, opts)
    print(report["summary"])
    print(f"shards: {report['records']['train']} train + {report['records']['val']} val records in {args.out} "
          f"(index.json; skips by reason in report.json)")
    return 0


def _add_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="image-caption folder or JSONL -> tar shards for streamed training")
    p.add_argument("source", help="DIR with captions.jsonl, or a JSONL of {\"image\": path, \"caption\": ...}")
    p.add_argument("--out", required=True, help="output directory (new, or without an index.json)")
    p.add_argument("--image-size", type=int, default=64, help="square side after centre-crop + resize")
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of records held out as the val split")
    p.add_argument("--max-caption-tokens", type=int, default=64, help="longer captions are dropped")
    p.add_argument("--tokenizer", default="", help="tokenizer.json measuring captions (default: the shipped one)")
    p.set_defaults(func=cmd_shard)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (FID, alignment, CIDEr, perplexity)")
    try:
        from transfusion.evaluate.report import add_eval_args, run_eval
    except ImportError:
        p.set_defaults(func=lambda a: _missing("the evaluation suite (transfusion.evaluate.report)"))
        return
    add_eval_args(p)

    def run(a: argparse.Namespace) -> int:
        result = run_eval(a)
        return result if isinstance(result, int) else 0

    p.set_defaults(func=run)


def _missing(what: str) -> int:
    log.error(f"{what} is not available in this build")
    return 2


# ------------------------------------------------------------------------------------------ parser


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint) or a step directory")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: run the network under bf16 autocast (~1.3-1.8x faster on CPUs with AVX512-BF16, "
                        "much more on GPUs; images differ from fp32 by rounding). Default fp32: exact")


def _precision(model: Any, precision: str):
    """The autocast context for `--precision` on the model's device (a no-op context for fp32)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def _add_inference_verbs(sub: argparse._SubParsersAction) -> None:
    """sample / caption / edit / generate: the verbs that run a trained model once."""
    p = sub.add_parser("sample", help="text -> image(s)")
    _add_inference_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="PNG path (a grid when --n > 1)")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="denoising steps (default: diffusion.sample_steps)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: diffusion.cfg_scale)")
    p.add_argument("--sampler", choices=[s.value for s in config_mod.Sampler], default=None)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling for viewing")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("caption", help="image -> text")
    _add_inference_args(p)
    p.add_argument("--image", required=True, nargs="+", help="PNG/JPEG file(s)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("edit", help="image + instruction -> edited image (a model fine-tuned on edits)")
    _add_inference_args(p)
    p.add_argument("--image", required=True, nargs="+", help="PNG/JPEG file(s) to edit")
    p.add_argument("--instruction", required=True, help='what to change, e.g. "make it red"')
    p.add_argument("--out", required=True, help="PNG path (a grid when several images)")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (default: diffusion.sample_steps)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale; the unconditional twin drops the instruction, keeps the image "
                        "(default: diffusion.cfg_scale)")
    p.add_argument("--sampler", choices=[s.value for s in config_mod.Sampler], default=None)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling for viewing")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("generate", help="free mode-switching generation: text, and images wherever BOI appears")
    _add_inference_args(p)
    p.add_argument("--prompt", required=True, action="append",
                   help="repeat for several documents, generated together (prompt i uses seed --seed + i)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 -> greedy (the paper's text decoding)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature > 0")
    p.add_argument("--min-new-tokens", type=int, default=0, help="no end of document (EOS) before this many tokens")
    p.add_argument("--steps", type=int, default=0, help="denoising steps per image (default: diffusion.sample_steps)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale for images (default: diffusion.cfg_scale)")
    p.add_argument("--out-dir", default=".", help="where generated images are saved")
    p.add_argument("--name", default="generated", help="image file name prefix")
    p.add_argument("--scale", type=int, default=4)
    p.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transfusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a TOML config")
    p.add_argument("config", help="TOML config, e.g. configs/tiny.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, PNGs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--init-from", default="", metavar="RUN",
                   help="fine-tune: start from the weights (and EMA) of RUN's latest checkpoint (or a step "
                        "directory) with a fresh optimiser at step 0; the architecture must match")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="training checkpoint -> single-file safetensors checkpoint")
    p.add_argument("ckpt", help="run directory (uses its latest checkpoint) or a step directory")
    p.add_argument("--out", required=True, help="directory for the export (OUT/checkpoints/step_XXXXXXXX)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("release", help="a run's checkpoint -> a directory to publish: weights, config, tokenizer, "
                                       "model card")
    p.add_argument("run", help="run directory (uses its latest checkpoint) or a step directory")
    p.add_argument("--out", required=True, help="new directory for the release (loadable as --ckpt OUT)")
    p.add_argument("--no-ema", action="store_true", help="release the raw training weights instead of the EMA")
    p.add_argument("--eval", action="append", metavar="REPORT.json",
                   help="`transfusion eval` report(s) for the card (default: eval*.json kept with the run)")
    p.set_defaults(func=cmd_release)

    _add_inference_verbs(sub)

    p = sub.add_parser("serve", help="the web demo: a page and a JSON/PNG API for one model")
    p.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint) or a step directory")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=4.0, help="uploads above this are refused (413)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="decoded image size limit (413)")
    p.add_argument("--max-queue", type=int, default=8, help="requests queued or running; more get 429")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request, queue wait included (504)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prepare", help="check the data and tokenizer a config will use")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_prepare)

    _add_shard(sub)
    from transfusion.tokenizer_cli import add_verb as add_tokenizer_verb

    add_tokenizer_verb(sub)  # tokenizer: a BPE on a user's text
    _add_eval(sub)
    _add_sweep(sub)
    from transfusion.autoencoder.cli import add_verbs as add_autoencoder_verbs

    add_autoencoder_verbs(sub)  # train-vae, eval-vae
    return parser


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a grid of configs x seeds: train, eval, table and metric-vs-FLOPs plots")
    p.add_argument("spec", help="sweep spec TOML, e.g. configs/sweeps/table5_mask_encoder.toml (docs/sweeps.md)")
    p.add_argument("--out", required=True, help="sweep directory; rerun with the same --out to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, after the spec's (e.g. runtime.threads=1 for two sweeps at once)")
    p.add_argument("--only", action="append", default=[], metavar="AXIS=LABEL[,LABEL]",
                   help="run only these values of an axis, or seed=S (repeatable), e.g. encoder=linear; the full "
                        "sweep with the same --out later reuses those runs")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from transfusion.sweep import run_sweep

    try:
        run_sweep(args.spec, args.out, args.set, args.only)
    except RuntimeError as e:  # a run's train/eval subprocess failed; its log says why
        raise CLIError(f"sweep stopped: {e}; fix it and rerun the same command to resume") from None
    print(f"wrote {Path(args.out) / 'sweep.md'}, sweep.json and plots/")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    known = _known_errors()
    try:
        return int(args.func(args))
    except known as e:
        if env.debug():
            raise
        if env.is_rank0():
            log.error(str(e))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
