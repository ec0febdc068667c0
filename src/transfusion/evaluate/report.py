"""`transfusion eval`: every metric of the suite in one JSON report, with sample grids and a markdown summary.

    evaluate(ckpt_dir, suite="fast" | "full", n=None, out="report.json")   -> dict (also written to `out`)
    score_folder(images_dir, out=...)                                       -> dict, for any generator's images

Beside REPORT.json it writes REPORT_samples/<prompt>.png (the samples of each prompt), REPORT_grid.png and
REPORT.md. Keys: fid, fd_classifier, diversity{diversity_ratio, precision, recall, ...},
alignment{item, colour, both, both_seen, both_heldout, ...}, cider,
caption_accuracy{item, colour, both}, perplexity, ranked_accuracy, n_samples, sampler, steps, cfg, counts of
every sample set, classifier_test_accuracy and seconds per stage. A metric that cannot be computed is null with
the reason under `skipped_metrics`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transfusion.data import fashion


@dataclass(frozen=True)
class Suite:
    n_samples: int  # generated images (text -> image)
    n_captions: int  # real test images captioned (image -> text)
    n_ranked: int  # real test images for ranked classification (80 candidates each)
    ppl_tokens: int | None  # held-out Shakespeare tokens (None = all)
    fid: bool  # Inception FID (~0.3 s per image on 2 cores, real and generated)
    heldout_share: float = 0.25  # share of prompts from fashion.HELDOUT, so held-out alignment is measured


SUITES: dict[str, Suite] = {
    "fast": Suite(n_samples=64, n_captions=64, n_ranked=16, ppl_tokens=8192, fid=True),
    "full": Suite(n_samples=1000, n_captions=1000, n_ranked=400, ppl_tokens=None, fid=True),
}


class EvalError(RuntimeError):
    """A checkpoint or input the suite cannot evaluate; the message says why."""


def _check_model(cfg) -> None:
    """The suite scores colour-fashion images: the dataset of the checkpoint's config must say it applies."""
    from transfusion.data.registry import get_dataset

    suite = get_dataset(cfg.data).eval_suite
    if suite == "edit":
        raise EvalError(f"this checkpoint was fine-tuned on edits (data.dataset={cfg.data.dataset!r}); "
                        "score it with --suite edit")
    if suite != "colour_fashion" or cfg.model.image_channels != 3:
        raise EvalError(
            f"the evaluation suite scores RGB colour-fashion images, but this checkpoint was trained on "
            f"data.dataset={cfg.data.dataset!r} with model.image_channels={cfg.model.image_channels}; "
            "score its samples with --images instead"
        )


def generate_for_prompts(model, tok, cfg, items: Tensor, colours: Tensor, steps: int, cfg_scale: float,
                         sampler: str, seed: int, batch: int = 16, progress: bool = True) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] for the colour-fashion prompts (items[i], colours[i]), `batch` at a time."""
    from tqdm.auto import tqdm

    from transfusion.diffusion import build_schedule
    from transfusion.decoding import generate_images

    schedule = build_schedule(cfg.diffusion)
    prompts = [fashion.caption(int(i), int(c)) for i, c in zip(items, colours)]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in tqdm(range(0, len(prompts), batch), desc="generate", disable=not progress):
        with torch.no_grad():
            out.append(generate_images(model, tok, prompts[k : k + batch], schedule, steps=steps,
                                       cfg_scale=cfg_scale, sampler=sampler, generator=gen, progress=False))
    return torch.cat(out).float().clamp(-1, 1)


def save_sample_grids(images: Tensor, items: Tensor, colours: Tensor, out_dir: Path) -> list[str]:
    """One PNG per prompt (its samples side by side) + an all-samples grid; returns the files written."""
    from transfusion.metrics import save_image_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, c in sorted({(int(i), int(c)) for i, c in zip(items, colours)}):
        sel = (items == i) & (colours == c)
        name = fashion.caption(i, c).replace(" ", "_") + ".png"
        save_image_grid(images[sel], out_dir / name, nrow=min(8, int(sel.sum())), scale=2)
        written.append(str(out_dir / name))
    return written


def _timed(timings: dict[str, float], name: str, fn, *args, **kw):
    start = time.time()
    result = fn(*args, **kw)
    timings[name] = round(time.time() - start, 2)
    return result


def _image_metrics(report, timings, images, items, colours, clf, suite: Suite, seed: int, progress: bool) -> None:
    from transfusion.evaluate import alignment, fid
    from transfusion.evaluate.diversity import diversity_report
    from transfusion.evaluate.reference import real_images

    report["alignment"] = _timed(timings, "alignment", lambda: alignment.score_alignment(
        images, items, colours, clf).summary())
    real = real_images(items, colours, seed=seed)
    report["n_real"] = len(real)
    report["fd_classifier"] = _timed(timings, "fd_classifier", fid.fd_classifier, images, real, clf)
    if len(images) > 3:  # diversity vs the matched real set (precision/recall need more than k = 3 images)
        report["diversity"] = _timed(timings, "diversity", diversity_report, clf, images, real, items, colours)
    report["fid"] = None
    if suite.fid:
        try:
            report["fid"] = _timed(timings, "fid", fid.fid, images, real, progress=progress)
        except fid.InceptionMissing as e:
            report["skipped_metrics"]["fid"] = str(e)


def _text_metrics(report, timings, model, tok, cfg, suite: Suite, seed: int, progress: bool) -> None:
    from transfusion.evaluate.cider import score_captions
    from transfusion.evaluate.perplexity import heldout_perplexity
    from transfusion.evaluate.ranked import ranked_accuracy
    from transfusion.evaluate.reference import eval_prompts, real_images
    from transfusion.decoding import caption_images

    size = cfg.model.image_size
    items, colours = eval_prompts(suite.n_captions, seed=seed + 1)
    real = real_images(items, colours, seed=seed + 1, size=size)
    captions = _timed(timings, "captions", lambda: [
        c for k in range(0, len(real), 32) for c in caption_images(model, tok, real[k : k + 32])])
    scores = score_captions(captions, items.tolist(), colours.tolist())
    report.update(cider=scores.cider, n_captions=scores.n,
                  caption_accuracy={"item": scores.item, "colour": scores.colour, "both": scores.both},
                  caption_examples=[{"truth": fashion.caption(int(i), int(c)), "caption": t}
                                    for i, c, t in list(zip(items, colours, captions))[:8]])
    items, colours = eval_prompts(suite.n_ranked, seed=seed + 2)
    real = real_images(items, colours, seed=seed + 2, size=size)
    ranked = _timed(timings, "ranked", ranked_accuracy, model, tok, real, items, colours, progress=progress)
    report.update(ranked_accuracy=ranked.accuracy, ranked=asdict(ranked))
    try:
        ppl = _timed(timings, "perplexity", heldout_perplexity, model, tok, max_tokens=suite.ppl_tokens,
                     progress=progress)
        report.update(perplexity=ppl.perplexity, perplexity_detail=asdict(ppl))
    except FileNotFoundError as e:  # the Shakespeare corpus is not installed
        report["perplexity"] = None
        report["skipped_metrics"]["perplexity"] = str(e)


def load_model(ckpt_dir: str | Path, use_ema: bool = True):
    """(model, config, tokenizer, checkpoint path) via transfusion.inference.load."""
    from transfusion.inference import load

    m = load(ckpt_dir, use_ema=use_ema)
    _check_model(m.config)
    return m.model, m.config, m.tokenizer, m.path


def evaluate(
    ckpt_dir: str | Path, suite: str = "fast", n: int | None = None, out: str | Path = "eval/report.json",
    steps: int | None = None, cfg_scale: float | None = None, sampler: str | None = None, seed: int = 0,
    use_ema: bool = True, with_fid: bool | None = None, classifier=None, progress: bool = True,
) -> dict[str, Any]:
    """Run the whole suite on a checkpoint; write the JSON report, grids and markdown; return the report."""
    from transfusion.evaluate.classifier import get_classifier
    from transfusion.evaluate.reference import eval_prompts

    if suite not in SUITES:
        raise EvalError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    spec = SUITES[suite]
    if n is not None:
        spec = replace(spec, n_samples=n, n_captions=n, n_ranked=max(1, min(spec.n_ranked, n)))
    if with_fid is not None:
        spec = replace(spec, fid=with_fid)
    start, timings = time.time(), {}
    model, cfg, tok, path = load_model(ckpt_dir, use_ema)
    clf = classifier or _timed(timings, "classifier", get_classifier, progress=progress)
    from transfusion.decoding import sampling_args

    sampling = sampling_args(cfg.diffusion, steps, cfg_scale, sampler)
    steps, cfg_scale, sampler = sampling["steps"], sampling["cfg_scale"], sampling["sampler"]
    report: dict[str, Any] = {
        "checkpoint": str(path), "suite": suite, "n_samples": spec.n_samples, "sampler": sampler,
        "steps": steps, "cfg": cfg_scale, "seed": seed, "ema": use_ema,
        "classifier_test_accuracy": clf.test_accuracy, "skipped_metrics": {},
    }
    items, colours = eval_prompts(spec.n_samples, seed=seed, heldout_share=spec.heldout_share)
    images = _timed(timings, "generate", generate_for_prompts, model, tok, cfg, items, colours, steps, cfg_scale,
                    sampler, seed, progress=progress)
    _image_metrics(report, timings, images, items, colours, clf, spec, seed, progress)
    _text_metrics(report, timings, model, tok, cfg, spec, seed, progress)
    out = Path(out)
    report["grids"] = save_sample_grids(images, items, colours, out.with_name(out.stem + "_samples"))
    _save_overview(images, out.with_name(out.stem + "_grid.png"))
    report["seconds"] = {**timings, "total": round(time.time() - start, 1)}
    write_report(report, out)
    return report


def _save_overview(images: Tensor, path: Path) -> None:
    from transfusion.metrics import save_image_grid

    save_image_grid(images[:64], path, nrow=8, scale=2)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_summary(report: dict[str, Any]) -> str:
    a = report.get("alignment") or {}
    cap = report.get("caption_accuracy") or {}
    div = report.get("diversity") or {}
    lines = [
        f"# Evaluation: {report.get('checkpoint', report.get('folder', '?'))}",
        "",
        f"suite `{report.get('suite', 'folder')}`, {report.get('n_samples')} samples, sampler "
        f"{report.get('sampler', '-')}, {report.get('steps', '-')} steps, CFG {report.get('cfg', '-')}; "
        f"item classifier test accuracy {_fmt(report.get('classifier_test_accuracy'))}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| FID (Inception, {report.get('n_samples')} vs {report.get('n_real', '-')} real) | {_fmt(report.get('fid'))} |",
        f"| FD classifier features | {_fmt(report.get('fd_classifier'))} |",
        f"| diversity vs real (spread ratio) / precision / recall | {_fmt(div.get('diversity_ratio'))} / "
        f"{_fmt(div.get('precision'))} / {_fmt(div.get('recall'))} |",
        f"| alignment item / colour / both | {_fmt(a.get('item'))} / {_fmt(a.get('colour'))} / {_fmt(a.get('both'))} |",
        f"| both, seen / held-out combos ({a.get('n_heldout', 0)} held-out) | {_fmt(a.get('both_seen'))} / "
        f"{_fmt(a.get('both_heldout'))} |",
        f"| CIDEr-D ({report.get('n_captions', 0)} captions) | {_fmt(report.get('cider'))} |",
        f"| caption item / colour / both | {_fmt(cap.get('item'))} / {_fmt(cap.get('colour'))} / {_fmt(cap.get('both'))} |",
        f"| ranked classification (1 of 80) | {_fmt(report.get('ranked_accuracy'))} |",
        f"| held-out Shakespeare perplexity | {_fmt(report.get('perplexity'))} |",
    ]
    if report.get("skipped"):
        lines += ["", f"skipped inputs: {report['skipped']}"]
    if report.get("skipped_metrics"):
        lines += ["", *[f"- {k} not computed: {v}" for k, v in report["skipped_metrics"].items()]]
    if report.get("seconds"):
        lines += ["", "seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items())]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--out", default="eval/report.json", help="JSON report path (grids and .md written beside it)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: diffusion.sample_steps)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: diffusion.cfg_scale)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"], default=None,
                   help="default: diffusion.sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--no-fid", action="store_true", help="skip the Inception FID (the slowest metric)")


def run_eval(args: argparse.Namespace) -> int:
    """Entry point of `transfusion eval`; prints the markdown summary, returns the exit code."""
    from transfusion.backends import setup_process
    from transfusion.config import RuntimeConfig

    setup_process(RuntimeConfig())  # the default process settings; the checkpoint's kernels come with its load
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
