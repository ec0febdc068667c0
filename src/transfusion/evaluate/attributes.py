"""Exact attribute scores for any dataset that defines attributes (Dataset.attributes): per attribute right,
all asked attributes right, and the same over seen and held-out combinations apart.

The same summary scores generated images (attributes read off the pixels by the dataset's attribute reader)
and generated captions (attributes parsed from the text by Dataset.parse_caption). A label of -1 means the
prompt did not ask for that attribute: it is left out of that attribute's share, and a row asking for none of
them is left out of "all".

Keys: one per attribute (e.g. item, colour), `all`, `all_seen`, `all_heldout`, `<attribute>_heldout`, `n`,
`n_heldout`. With exactly two attributes the report also carries `both`, `both_seen`, `both_heldout` (the same
numbers as `all*`): the names colour fashion's reports have always used.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _share(ok: Tensor, mask: Tensor) -> float | None:
    return float(ok[mask].float().mean()) if bool(mask.any()) else None


def attribute_hits(labels: dict[str, Tensor], pred: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Per attribute (N,) bool right (only where asked), and (N,) bool all asked attributes right."""
    n = len(next(iter(labels.values()))) if labels else 0
    every = torch.ones(n, dtype=torch.bool)
    hits = {}
    for name, want in labels.items():
        got = pred.get(name, torch.full_like(want, -1))
        hits[name] = (got.long() == want.long()) & (want >= 0)
        every &= hits[name] | (want < 0)
    return hits, every


def summarise(labels: dict[str, Tensor], pred: dict[str, Tensor], heldout: Tensor | None = None
              ) -> dict[str, float | int | None]:
    """labels / pred: attribute -> (N,) long; heldout (N,) bool -> the summary of the module docstring."""
    hits, every = attribute_hits(labels, pred)
    n = len(every)
    held = heldout.bool() if heldout is not None else torch.zeros(n, dtype=torch.bool)
    out: dict[str, float | int | None] = {}
    for name, ok in hits.items():
        out[name] = _share(ok, labels[name] >= 0)
    # a row that asks for none of the read attributes (an emoji without skin tones, scored on tone) is no
    # evidence either way: it is left out of `all` rather than counted right
    asked = torch.zeros(n, dtype=torch.bool)
    for want in labels.values():
        asked |= want >= 0
    out["all"] = _share(every, asked)
    out["all_seen"] = _share(every, asked & ~held)
    out["all_heldout"] = _share(every, asked & held)
    for name, ok in hits.items():
        out[f"{name}_heldout"] = _share(ok, held & (labels[name] >= 0))
    out["n"], out["n_heldout"] = n, int(held.sum())
    if len(labels) == 2:
        out.update(both=out["all"], both_seen=out["all_seen"], both_heldout=out["all_heldout"])
    return out


def parsed_labels(texts: list[str], parse, names: list[str]) -> dict[str, Tensor]:
    """Attributes a list of captions names, via Dataset.parse_caption: attribute -> (N,) long (-1 = none)."""
    parsed = [parse(t) for t in texts]
    return {name: torch.tensor([int(p.get(name, -1)) for p in parsed], dtype=torch.long) for name in names}
