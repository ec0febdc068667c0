"""Image -> text half of the suite, for any dataset: caption real test images (CIDEr-D against every phrasing
of their caption; attributes named right, where the dataset defines attributes), rank the dataset's captions
by model likelihood, and held-out Shakespeare perplexity.
"""

from __future__ import annotations

from dataclasses import asdict

from transfusion.data.dataset import Dataset
from transfusion.evaluate.eval_set import EvalSet
from transfusion.evaluate.text_to_image import timed


def captioner(model, tok, cfg, codec=None):
    """images (N, 3, S, S) pixels -> captions, for the model's family and image space (codec.py)."""
    from transfusion.config import Family
    from transfusion.decoding import caption_images

    if cfg.model.family == Family.CHAMELEON:  # the image as its VQ codes (chameleon/decoding.py)
        from transfusion.chameleon.decoding import caption_images as chameleon_captions
        from transfusion.chameleon.vq import load_vq

        vq = load_vq(cfg)
        return lambda images: chameleon_captions(model, tok, vq, images)
    return lambda images: caption_images(model, tok, images, codec=codec)


def caption_metrics(report: dict, timings: dict, model, tok, es: EvalSet, ds: Dataset, caption=None) -> None:
    """cider, caption_accuracy{<attribute>, all (both)}, n_captions, caption_examples. `caption`: images -> texts
    (`captioner`; default: a pixel-space Transfusion model's)."""
    from transfusion.decoding import caption_images

    caption = caption or (lambda images: caption_images(model, tok, images))
    from transfusion.evaluate.attributes import parsed_labels, summarise
    from transfusion.evaluate.cider import cider_d

    skipped = report["skipped_metrics"]
    report["cider"] = report["caption_accuracy"] = None
    if es.real is None:
        skipped["cider"] = skipped["caption_accuracy"] = es.reasons.get("real", "no real test images to caption")
        report["n_captions"] = 0
        return
    real = es.real
    captions = timed(timings, "captions", lambda: [
        c for k in range(0, len(real), 32) for c in caption(real[k : k + 32])])
    report["n_captions"] = len(captions)
    report["caption_examples"] = [{"truth": t, "caption": c} for t, c in list(zip(es.prompts, captions))[:8]]
    if es.references:
        report["cider"] = cider_d(captions, es.references)[0] if captions else 0.0
    else:
        skipped["cider"] = es.reasons.get("references", "no caption references")
    if not es.labels:
        skipped["caption_accuracy"] = (f"the {ds.name} dataset defines no attributes to read from a caption "
                                       "(Dataset.attributes / parse_caption)")
        return
    scores = summarise(es.labels, parsed_labels(captions, ds.parse_caption, list(es.labels)))
    keep = [*es.labels, "all"] + (["both"] if "both" in scores else [])  # both: colour fashion's name for all
    report["caption_accuracy"] = {k: scores[k] for k in keep}


def ranked_metrics(report: dict, timings: dict, model, tok, es: EvalSet, ds: Dataset, pool: list[str],
                   seed: int, progress: bool, codec=None, cfg=None) -> None:
    """ranked_accuracy: the right caption among the dataset's captions (all when <= 100, else it + 99 others).
    `codec`: the model's image space (codec.py), the real images are encoded into it."""
    from transfusion.config import Family
    from transfusion.evaluate.clip import candidate_sets
    from transfusion.evaluate.ranked import ranked_retrieval

    report["ranked_accuracy"] = report["ranked"] = None
    if cfg is not None and cfg.model.family == Family.CHAMELEON:
        report["skipped_metrics"]["ranked_accuracy"] = ("caption likelihood ranking is written for Transfusion's "
                                                        "continuous images; not yet for Chameleon's image tokens")
        return
    if es.real is None or not pool:
        reason = es.reasons.get("real", "the dataset has no test captions to rank")
        report["skipped_metrics"]["ranked_accuracy"] = reason
        return
    cands = candidate_sets(es.prompts, pool, 100, seed)
    real = es.real if codec is None else codec.encode(es.real)  # what the model sees (VAE latents)
    ranked = timed(timings, "ranked", ranked_retrieval, model, tok, real, es.prompts, cands,
                   labels=es.labels, parse=ds.parse_caption, progress=progress)
    report.update(ranked_accuracy=ranked["accuracy"], ranked=ranked)


def perplexity_metrics(report: dict, timings: dict, model, tok, max_tokens: int | None, progress: bool,
                       data=None) -> None:
    """perplexity on the held-out text of the model's text source (`data`: its DataConfig)."""
    from transfusion.evaluate.perplexity import heldout_perplexity

    try:
        ppl = timed(timings, "perplexity", heldout_perplexity, model, tok, max_tokens=max_tokens, progress=progress,
                    data=data)
        report.update(perplexity=ppl.perplexity, perplexity_detail=asdict(ppl))
    except FileNotFoundError as e:  # the Shakespeare corpus is not installed
        report["perplexity"] = None
        report["skipped_metrics"]["perplexity"] = str(e)
