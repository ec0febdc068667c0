"""The markdown summary of an evaluation report (REPORT.md and what `transfusion eval` prints): one table row per
metric, attribute rows named by the dataset's attributes, and every skipped metric with its reason."""

from __future__ import annotations

from typing import Any

_NOT_ATTRIBUTES = {"all", "all_seen", "all_heldout", "both", "both_seen", "both_heldout", "n", "n_heldout", "not_read"}


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _all(scores: dict[str, Any], suffix: str = "") -> Any:
    """The all-attributes-right share; reports of score_folder (colour fashion only) name it `both`."""
    return scores.get("all" + suffix, scores.get("both" + suffix))


def _attribute_names(scores: dict[str, Any]) -> list[str]:
    return [k for k in scores if k not in _NOT_ATTRIBUTES and not k.endswith("_heldout")]


def _attribute_rows(label: str, scores: dict[str, Any]) -> list[str]:
    """'| alignment item / colour / all | 0.9 / 1 / 0.9 |' for whatever attributes the dataset has."""
    if not scores:
        return [f"| {label} | n/a |"]
    names = _attribute_names(scores)
    values = [fmt(scores.get(k)) for k in names] + [fmt(_all(scores))]
    return [f"| {label} {' / '.join(names + ['all'])} | {' / '.join(values)} |"]


def _clip_rows(report: dict[str, Any]) -> list[str]:
    real = report.get("clip_real") or {}
    ret, real_ret = report.get("clip_retrieval") or {}, real.get("retrieval") or {}
    k = ret.get("n_candidates", real.get("n_candidates", "-"))
    return [
        f"| clip_score, generated / real test images (100 x cosine) | {fmt(report.get('clip_score'))} / "
        f"{fmt(real.get('clip_score'))} |",
        f"| clip retrieval top-1 of {k}, generated / real (seen, held-out generated) | {fmt(ret.get('top1'))} / "
        f"{fmt(real_ret.get('top1'))} ({fmt(ret.get('top1_seen'))}, {fmt(ret.get('top1_heldout'))}) |",
        f"| scorer calibration: top-1 of {real.get('n_candidates', '-')} real test pairs / shuffled | "
        f"{fmt(real.get('top1_real'))} / {fmt(real.get('top1_shuffled'))} |",
    ]


def markdown_summary(report: dict[str, Any]) -> str:
    a = report.get("alignment") or {}
    div = report.get("diversity") or {}
    ranked = report.get("ranked") or {}
    clf = report.get("classifier_test_accuracy")
    lines = [
        f"# Evaluation: {report.get('checkpoint', report.get('folder', '?'))}",
        "",
        f"dataset `{report.get('dataset', 'colour_fashion')}`, suite `{report.get('suite', 'folder')}`, "
        f"{report.get('n_samples')} samples, sampler {report.get('sampler', '-')}, {report.get('steps', '-')} "
        f"steps, CFG {report.get('cfg', '-')}" + (f"; item classifier test accuracy {fmt(clf)}" if clf else ""),
        "",
        "| metric | value |",
        "|---|---|",
        f"| FID (Inception, {report.get('n_samples')} vs {report.get('n_real', '-')} real) | "
        f"{fmt(report.get('fid'))} |",
        f"| FD classifier features | {fmt(report.get('fd_classifier'))} |",
        f"| diversity vs real (spread ratio) / precision / recall | {fmt(div.get('diversity_ratio'))} / "
        f"{fmt(div.get('precision'))} / {fmt(div.get('recall'))} |",
        *_attribute_rows("alignment", a),
        f"| all right, seen / held-out combos ({a.get('n_heldout', 0)} held-out) | {fmt(_all(a, '_seen'))} / "
        f"{fmt(_all(a, '_heldout'))} |",
        *_clip_rows(report),
        f"| CIDEr-D ({report.get('n_captions', 0)} captions) | {fmt(report.get('cider'))} |",
        *_attribute_rows("caption", report.get("caption_accuracy") or {}),
        f"| ranked classification (1 of {ranked.get('n_candidates', '-')}) | {fmt(report.get('ranked_accuracy'))} |",
        f"| held-out Shakespeare perplexity | {fmt(report.get('perplexity'))} |",
    ]
    if report.get("skipped"):
        lines += ["", f"skipped inputs: {report['skipped']}"]
    if report.get("skipped_metrics"):
        lines += ["", *[f"- {k} not computed: {v}" for k, v in report["skipped_metrics"].items()]]
    if report.get("seconds"):
        lines += ["", "seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items())]
    return "\n".join(lines) + "\n"
