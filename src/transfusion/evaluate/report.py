"""`transfusion eval`: every metric of the suite in one JSON report, with sample grids and a markdown summary.

    evaluate(ckpt_dir, suite="fast" | "full", n=None, out="report.json")   -> dict (also written to `out`)
    score_folder(images_dir, out=...)                                       -> dict, for any generator's images

Beside REPORT.json it writes REPORT_samples/<prompt>.png (the samples of each prompt), REPORT_grid.png and
REPORT.md. The suite is dataset-driven: the checkpoint's `data.dataset` says what applies (Dataset's evaluation
hooks, evaluate/eval_set.py). Keys: fid, fd_classifier, diversity{diversity_ratio, precision, recall, ...},
alignment{<attribute>..., all, all_seen, all_heldout, ...; colour fashion: item, colour, both, both_seen,
both_heldout}, clip_score (100 x mean cosine of generated image and prompt under the project's image-text
scorer), clip_retrieval{top1, ...} (the prompt among the dataset's captions), clip_real (the scorer's
calibration on real test pairs and the same two numbers for the real reference images), cider,
caption_accuracy{<attribute>..., all}, perplexity, ranked_accuracy, n_samples, sampler, steps, cfg, counts of
every sample set, classifier_test_accuracy (colour fashion) and seconds per stage. A metric that cannot be
computed (the dataset has no attributes, no Inception installed, ...) is null with the reason under
`skipped_metrics`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from transfusion.data import fashion
from transfusion.evaluate.summary import markdown_summary
from transfusion.evaluate.text_to_image import timed

__all__ = ["EvalError", "SUITES", "Suite", "evaluate", "markdown_summary", "score_folder", "write_report"]


@dataclass(frozen=True)
class Suite:
    n_samples: int  # generated images (text -> image)
    n_captions: int  # real test images captioned (image -> text)
    n_ranked: int  # real test images for ranked classification (the dataset's captions, <= 100 candidates)
    ppl_tokens: int | None  # held-out Shakespeare tokens (None = all)
    fid: bool  # Inception FID (~0.3 s per image on 2 cores, real and generated)
    heldout_share: float = 0.25  # share of held-out combinations among the prompts (when the dataset has them)


SUITES: dict[str, Suite] = {
    "fast": Suite(n_samples=64, n_captions=64, n_ranked=16, ppl_tokens=8192, fid=True),
    "full": Suite(n_samples=1000, n_captions=1000, n_ranked=400, ppl_tokens=None, fid=True),
}


class EvalError(RuntimeError):
    """A checkpoint or input the suite cannot evaluate; the message says why."""


def _check_model(cfg) -> None:
    """Any dataset's checkpoint is scored here, except an edit fine-tune (its own suite) or a non-RGB model."""
    from transfusion.data.registry import get_dataset

    if get_dataset(cfg.data).eval_suite == "edit":
        raise EvalError(f"this checkpoint was fine-tuned on edits (data.dataset={cfg.data.dataset!r}); "
                        "score it with --suite edit")
    if cfg.model.image_channels != 3 and not cfg.data.vae:  # latents (data.vae) are decoded to RGB (codec.py)
        raise EvalError(
            f"the evaluation suite scores RGB images, but this checkpoint was trained on "
            f"data.dataset={cfg.data.dataset!r} with model.image_channels={cfg.model.image_channels}; "
            "score its samples with --images instead"
        )


def generate_for_prompts(model, tok, cfg, items: Tensor, colours: Tensor, steps: int, cfg_scale: float,
                         sampler: str, seed: int, batch: int = 16, progress: bool = True) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] for the colour-fashion prompts (items[i], colours[i]) (benchmarks)."""
    from transfusion.evaluate.text_to_image import generate_images_for

    prompts = [fashion.caption(int(i), int(c)) for i, c in zip(items, colours)]
    return generate_images_for(model, tok, cfg, prompts, steps, cfg_scale, sampler, seed, batch, progress)


def load_model(ckpt_dir: str | Path, use_ema: bool = True):
    """transfusion.inference.load's Loaded (model, config, tokenizer, path, codec), checked for the suite."""
    from transfusion.inference import load

    m = load(ckpt_dir, use_ema=use_ema)
    _check_model(m.config)
    return m


def _scorers(ds, size: int, classifier, clip_config, timings: dict, skipped: dict, progress: bool):
    """(attribute reader or None, image-text scorer or None); a missing one leaves its reason in `skipped`."""
    from transfusion.evaluate.clip import get_scorer

    reader = None
    if ds.attributes():
        kw = {"classifier": classifier} if classifier is not None else {}
        reader = timed(timings, "classifier", ds.attribute_reader, size, **kw)
    scorer = None
    try:
        kw = {"cfg": clip_config} if clip_config is not None else {}
        scorer = timed(timings, "clip_scorer", get_scorer, ds, size, progress=progress, **kw)
    except Exception as e:  # a dataset whose training split cannot be read cannot have a scorer
        for key in ("clip_score", "clip_retrieval", "clip_real"):
            skipped[key] = f"no image-text scorer for the {ds.name} dataset: {type(e).__name__}: {e}"
    return reader, scorer


def evaluate(
    ckpt_dir: str | Path, suite: str = "fast", n: int | None = None, out: str | Path = "eval/report.json",
    steps: int | None = None, cfg_scale: float | None = None, sampler: str | None = None, seed: int = 0,
    use_ema: bool = True, with_fid: bool | None = None, classifier=None, clip_config=None, progress: bool = True,
) -> dict[str, Any]:
    """Run the whole suite on a checkpoint, asking its dataset (cfg.data) what applies; write the JSON report,
    grids and markdown; return the report. `classifier`: an item classifier for colour fashion's reader
    instead of the cached full one, `clip_config`: the image-text scorer's (evaluate/clip.ClipConfig) (tests)."""
    from transfusion.data.registry import get_dataset
    from transfusion.decoding import sampling_args
    from transfusion.evaluate import image_to_text as i2t
    from transfusion.evaluate import text_to_image as t2i
    from transfusion.evaluate.eval_set import EvalSplit, build_eval_set

    if suite not in SUITES:
        raise EvalError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    spec = SUITES[suite]
    if n is not None:
        spec = replace(spec, n_samples=n, n_captions=n, n_ranked=max(1, min(spec.n_ranked, n)))
    if with_fid is not None:
        spec = replace(spec, fid=with_fid)
    start, timings = time.time(), {}
    m = load_model(ckpt_dir, use_ema)
    model, cfg, tok, path, codec = m.model, m.config, m.tokenizer, m.path, m.codec
    ds, size = get_dataset(cfg.data), codec.pixel_size  # scored as pixels (a latent model's are decoded)
    sampling = sampling_args(cfg.diffusion, steps, cfg_scale, sampler)
    report: dict[str, Any] = {
        "checkpoint": str(path), "dataset": ds.name, "suite": suite, "n_samples": spec.n_samples,
        "sampler": sampling["sampler"], "steps": sampling["steps"], "cfg": sampling["cfg_scale"], "seed": seed,
        "ema": use_ema, "clip_score": None, "clip_real": None, "skipped_metrics": {},
    }
    skipped = report["skipped_metrics"]
    reader, scorer = _scorers(ds, size, classifier, clip_config, timings, skipped, progress)
    if reader is not None and hasattr(reader, "calibration"):
        report.update(reader.calibration())
    if scorer is not None and scorer.calibration is not None:
        report["clip_real"] = {**asdict(scorer.calibration), "train_seconds": scorer.train_seconds, **scorer.meta}
    split = EvalSplit(ds, tok, size)
    try:
        pool = split.caption_pool()
    except Exception as e:  # e.g. a shard directory without a test split
        raise EvalError(f"cannot read the test split of data.dataset={ds.name!r}: {type(e).__name__}: {e}") from e
    es = build_eval_set(ds, split, spec.n_samples, seed, spec.heldout_share)
    images = timed(timings, "generate", t2i.generate_images_for, model, tok, cfg, es.prompts, sampling["steps"],
                   sampling["cfg_scale"], sampling["sampler"], seed, progress=progress, codec=codec)
    ctx = {"report": report, "timings": timings}
    t2i.alignment_metrics(**ctx, images=images, es=es, reader=reader, ds_name=ds.name)
    t2i.distribution_metrics(**ctx, images=images, es=es, reader=reader, scorer=scorer, with_fid=spec.fid,
                             progress=progress)
    t2i.clip_metrics(**ctx, images=images, es=es, scorer=scorer, pool=pool, seed=seed)
    i2t.caption_metrics(**ctx, model=model, tok=tok, es=build_eval_set(ds, split, spec.n_captions, seed + 1, 0.0),
                        ds=ds, caption=i2t.captioner(model, tok, cfg, codec))
    i2t.ranked_metrics(**ctx, model=model, tok=tok, es=build_eval_set(ds, split, spec.n_ranked, seed + 2, 0.0),
                       ds=ds, pool=pool, seed=seed, progress=progress, codec=codec, cfg=cfg)
    i2t.perplexity_metrics(**ctx, model=model, tok=tok, max_tokens=spec.ppl_tokens, progress=progress,
                           data=cfg.data)
    out = Path(out)
    report["grids"] = t2i.save_sample_grids(images, es.prompts, out.with_name(out.stem + "_samples"))
    _save_overview(images, out.with_name(out.stem + "_grid.png"))
    report["seconds"] = {**timings, "total": round(time.time() - start, 1)}
    write_report(report, out)
    return report


def _save_overview(images: Tensor, path: Path) -> None:
    from transfusion.metrics import save_image_grid

    save_image_grid(images[:64], path, nrow=8, scale=2)


def write_report(report: dict[str, Any], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown_summary(report))


def score_folder(images_dir: str | Path, out: str | Path, with_fid: bool = True, progress: bool = True) -> dict:
    """Score another generator's images (DIR + prompts.jsonl) with the same scorers; write the report."""
    from transfusion.evaluate.images_folder import score_images_folder

    start = time.time()
    report = score_images_folder(images_dir, with_fid=with_fid, progress=progress)
    report["seconds"] = {"total": round(time.time() - start, 1)}
    write_report(report, out)
    return report


# --------------------------------------------------------------------------------------------------- CLI


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `transfusion eval` (the CLI module wires this in)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run directory (its latest checkpoint) or a step directory")
    src.add_argument("--images", help="score a folder of images + prompts.jsonl from any generator instead")
    p.add_argument("--suite", choices=sorted(SUITES) + ["edit"], default="fast",
                   help="fast: a few minutes on 2 cores; full: for long runs; edit: held-out recolour edits of "
                        "a model fine-tuned on edits (evaluate/edit.py) (default: fast)")
    p.add_argument("--n", type=int, default=None, help="generated samples (and captioned images; edits)")
    p.add_argument("--out", default=None, help="JSON report path, grids and .md written beside it (default: "
                   "RUN/eval/<suite>.json beside the checkpoint's run, where `release` finds it; IMAGES/eval/report.json)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: diffusion.sample_steps)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: diffusion.cfg_scale)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"], default=None,
                   help="default: diffusion.sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--no-fid", action="store_true", help="skip the Inception FID (the slowest metric)")


def default_out(ckpt: str | None, images: str | None, suite: str) -> Path:
    """Where a report goes without --out: with the run it scores (RUN/eval/<suite>.json; a step or release directory
    keeps its own eval/), or IMAGES/eval/report.json — never the current directory, which may be a checkout."""
    if images:
        return Path(images) / "eval" / "report.json"
    from transfusion.checkpoint.layout import CKPT_SUBDIR, CheckpointError, resolve

    path = Path(ckpt)
    try:
        step = resolve(path)
        path = step.parent.parent if step.parent.name == CKPT_SUBDIR else step
    except CheckpointError:  # a missing checkpoint: the evaluation itself says so, with the error it deserves
        pass
    return path / "eval" / f"{suite}.json"


def run_eval(args: argparse.Namespace) -> int:
    """Entry point of `transfusion eval`; prints the markdown summary, returns the exit code."""
    from transfusion.backends import setup_process
    from transfusion.config import RuntimeConfig

    setup_process(RuntimeConfig())  # the default process settings; the checkpoint's kernels come with its load
    if args.out is None:
        args.out = str(default_out(args.ckpt, args.images, args.suite))
    if args.images:
        report = score_folder(args.images, args.out, with_fid=not args.no_fid)
    elif args.suite == "edit":  # its own scorers and report (evaluate/edit.py)
        from transfusion.evaluate.edit import evaluate_edits
        from transfusion.evaluate.edit import markdown_summary as edit_summary

        report = evaluate_edits(args.ckpt, n=args.n, out=args.out, steps=args.steps, cfg_scale=args.cfg,
                                sampler=args.sampler, seed=args.seed, use_ema=not args.no_ema)
        print(edit_summary(report), end="")
        print(f"wrote {args.out}")
        return 0
    else:
        report = evaluate(args.ckpt, suite=args.suite, n=args.n, out=args.out, steps=args.steps,
                          cfg_scale=args.cfg, sampler=args.sampler, seed=args.seed, use_ema=not args.no_ema,
                          with_fid=False if args.no_fid else None)
    print(markdown_summary(report), end="")
    print(f"wrote {args.out}")
    return 0
