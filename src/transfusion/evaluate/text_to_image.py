"""Text -> image half of the suite, for any dataset: draw the evaluation prompts, then score the images with
whatever the dataset offers — exact attributes (alignment, seen vs held-out), the attribute classifier's
Fréchet distance and diversity, Inception FID against the matched real test images, and the image–text
scorer (evaluate/clip.py). A metric the dataset cannot support is null with its reason in `skipped`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from transfusion.evaluate.eval_set import EvalSet


def timed(timings: dict[str, float], name: str, fn: Callable, *args, **kw):
    start = time.time()
    result = fn(*args, **kw)
    timings[name] = round(time.time() - start, 2)
    return result


def generate_images_for(model, tok, cfg, prompts: list[str], steps: int, cfg_scale: float, sampler: str,
                        seed: int, batch: int = 16, progress: bool = True, codec=None) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] for `prompts`, `batch` at a time, one generator seeded once. `codec`: the
    model's image space (codec.py; latents are decoded to pixels). A Chameleon model samples its image tokens
    and decodes them through its VQ quantiser (chameleon/decoding.py)."""
    from tqdm.auto import tqdm

    from transfusion.config import Family
    from transfusion.decoding import generate_images
    from transfusion.diffusion import build_schedule

    if cfg.model.family == Family.CHAMELEON:
        from transfusion.chameleon.decoding import generate_images as chameleon_images
        from transfusion.chameleon.vq import load_vq

        vq = load_vq(cfg)

        def draw(chunk: list[str], gen: torch.Generator) -> Tensor:
            return chameleon_images(model, tok, vq, chunk, cfg_scale=cfg_scale, generator=gen)
    else:
        schedule = build_schedule(cfg.diffusion)

        def draw(chunk: list[str], gen: torch.Generator) -> Tensor:
            return generate_images(model, tok, chunk, schedule, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                                   generator=gen, progress=False, codec=codec)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in tqdm(range(0, len(prompts), batch), desc="generate", disable=not progress):
        with torch.no_grad():
            out.append(draw(prompts[k : k + batch], gen))
    return torch.cat(out).float().clamp(-1, 1)


def file_name(prompt: str) -> str:
    """A prompt as a safe file stem: 'a red t-shirt' -> 'a_red_t-shirt'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", prompt.replace(" ", "_")).strip("_")[:80] or "prompt"


def save_sample_grids(images: Tensor, prompts: list[str], out_dir: Path) -> list[str]:
    """One PNG per prompt (its samples side by side); returns the files written."""
    from transfusion.metrics import save_image_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in sorted(set(prompts)):
        sel = torch.tensor([q == p for q in prompts])
        path = out_dir / (file_name(p) + ".png")
        save_image_grid(images[sel], path, nrow=min(8, int(sel.sum())), scale=2)
        written.append(str(path))
    return written


def prompt_keys(es: EvalSet) -> tuple[Tensor, Tensor]:
    """(a, b) (N,) each, with a * 1000 + b one id per distinct prompt: the grouping diversity.per_prompt_spread
    uses. Colour fashion keeps (item, colour); any other dataset numbers its distinct prompts."""
    if set(es.labels) == {"item", "colour"}:
        return es.labels["item"], es.labels["colour"]
    ids = {p: j for j, p in enumerate(sorted(set(es.prompts)))}
    return torch.tensor([ids[p] for p in es.prompts]), torch.zeros(len(es.prompts), dtype=torch.long)


def alignment_metrics(report: dict, timings: dict, images: Tensor, es: EvalSet, reader, ds_name: str) -> None:
    """`alignment`: exact attributes read off the generated images (attributes.summarise)."""
    from transfusion.evaluate.attributes import summarise

    if reader is None or not es.labels:
        report["alignment"] = None
        report["skipped_metrics"]["alignment"] = (f"the {ds_name} dataset defines no attributes with an exact scorer "
                                          "(Dataset.attributes / attribute_reader)")
        return
    start = time.time()
    pred = reader(images)
    # only what the reader reads off the pixels is scored (emoji: the tone; its name and style are the
    # image-text scorer's): an attribute it does not read is not counted wrong
    labels = {name: want for name, want in es.labels.items() if name in pred}
    report["alignment"] = summarise(labels, pred, es.heldout) if labels else None
    if labels and len(labels) < len(es.labels):
        report["alignment"]["not_read"] = sorted(set(es.labels) - set(labels))
    if not labels:
        report["skipped_metrics"]["alignment"] = f"the {ds_name} attribute reader reads none of {sorted(es.labels)}"
    timings["alignment"] = round(time.time() - start, 2)


def distribution_metrics(report: dict, timings: dict, images: Tensor, es: EvalSet, reader, scorer,
                         with_fid: bool, progress: bool) -> None:
    """fd_classifier, diversity and FID of the generated images against the matched real ones."""
    from transfusion.evaluate import fid
    from transfusion.evaluate.diversity import diversity_report

    skipped = report["skipped_metrics"]
    report["n_real"] = 0 if es.real is None else len(es.real)
    report["fd_classifier"] = report["diversity"] = report["fid"] = None
    if es.real is None:
        for key in ("fd_classifier", "diversity", "fid"):
            skipped[key] = es.reasons.get("real", "no real reference images")
        return
    if reader is not None and hasattr(reader, "fd_features"):
        report["fd_classifier"] = timed(timings, "fd_classifier", lambda: fid.fd_from_features(
            reader.fd_features(images), reader.fd_features(es.real)))
    else:
        skipped["fd_classifier"] = "the dataset has no attribute classifier whose features it could use"
    features = reader if reader is not None and hasattr(reader, "features") else scorer
    if features is None:
        skipped["diversity"] = "no feature space: no attribute classifier and no image-text scorer"
    elif len(images) > 3:  # precision/recall need more than k = 3 images
        report["diversity"] = timed(timings, "diversity", diversity_report, features, images, es.real,
                                    *prompt_keys(es))
        report["diversity"]["features"] = "classifier" if features is reader else "clip"
    if not with_fid:
        skipped["fid"] = "not requested (--no-fid)"
        return
    try:
        report["fid"] = timed(timings, "fid", fid.fid, images, es.real, progress=progress)
    except fid.InceptionMissing as e:
        skipped["fid"] = str(e)


def clip_metrics(report: dict, timings: dict, images: Tensor, es: EvalSet, scorer, pool: list[str],
                 seed: int) -> None:
    """clip_score (100 x mean cosine of image and prompt, generated; `clip_real` holds the same for the real
    test images and the scorer's calibration) and clip_retrieval (the prompt's rank among the dataset's captions)."""
    from transfusion.evaluate import clip

    report["clip_retrieval"] = None
    if scorer is None:
        return
    start = time.time()
    cands = clip.candidate_sets(es.prompts, pool, 100, seed)
    ranks = clip.retrieval_ranks(scorer, images, es.prompts, cands)
    report["clip_score"] = 100.0 * float(clip.pair_cosine(scorer, images, es.prompts).mean())
    report["clip_retrieval"] = retrieval_summary(ranks, es.heldout, max(len(c) for c in cands))
    real = dict(report.get("clip_real") or {})
    if es.real is not None:
        real["clip_score"] = 100.0 * float(clip.pair_cosine(scorer, es.real, es.prompts).mean())
        real["retrieval"] = retrieval_summary(clip.retrieval_ranks(scorer, es.real, es.prompts, cands), es.heldout,
                                              max(len(c) for c in cands))
    report["clip_real"] = real
    timings["clip"] = round(time.time() - start, 2)


def retrieval_summary(ranks: Tensor, heldout: Tensor, n_candidates: int) -> dict[str, Any]:
    """(N,) ranks (0 = right caption first) -> top-1 / top-5 shares, mean rank, top-1 seen and held-out."""
    held = heldout.bool()

    def top1(mask: Tensor) -> float | None:
        return float((ranks[mask] == 0).float().mean()) if bool(mask.any()) else None

    return {"top1": top1(torch.ones_like(held)), "top5": float((ranks < 5).float().mean()),
            "mean_rank": float(ranks.float().mean() + 1), "top1_seen": top1(~held), "top1_heldout": top1(held),
            "n": len(ranks), "n_candidates": n_candidates}
