"""Exact, GenEval-style text→image alignment for colour fashion: item right, colour right, both right.

Stands in for CLIP score / GenEval, neither of which loads offline. The item comes from the project's classifier
(evaluate/classifier.py); the colour is read from the hue and saturation of the foreground pixels, which is
exact for the tints of `fashion.COLOURS` (a tinted pixel is `gray * colour`, so its hue and saturation are the
colour's, whatever the item's brightness).

Colour rule, per foreground pixel (max channel >= `fg_threshold`): saturation < `white_saturation` -> white,
else the chromatic colour of nearest hue. Pixels vote, weighted by brightness; the image's colour is the winner
when it holds at least `min_agreement` of the vote, else unknown (-1). Noise, whose pixels scatter over all hues,
therefore reads as unknown rather than as a lucky match.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from transfusion.data import fashion

UNKNOWN = -1


@dataclass(frozen=True)
class ColourRule:
    fg_threshold: float = 0.2  # foreground = max channel >= this (in [0, 1])
    white_saturation: float = 0.4  # every chromatic colour in fashion.COLOURS has saturation >= 0.8
    min_agreement: float = 0.5  # share of the brightness-weighted vote the winning colour needs
    min_pixels: int = 8  # fewer foreground pixels -> unknown (a black image has no colour)


def _reference_hues() -> tuple[Tensor, Tensor]:
    """(chromatic colour ids (K,), their hues in [0, 1) (K,)) from fashion.COLOURS; white is handled apart."""
    ids, hues = [], []
    for i, name in enumerate(fashion.COLOUR_NAMES):
        h, s, _ = colorsys.rgb_to_hsv(*fashion.COLOURS[name])
        if s >= ColourRule.white_saturation:
            ids.append(i)
            hues.append(h)
    return torch.tensor(ids), torch.tensor(hues, dtype=torch.float64)


def _hue_saturation(rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rgb (N, 3, P) in [0, 1] -> hue in [0, 1), saturation, value, each (N, P) (the HSV hexcone)."""
    r, g, b = rgb.unbind(1)
    v, _ = rgb.max(1)
    c = v - rgb.min(1).values  # chroma
    safe_c = c.clamp_min(1e-12)
    h = torch.where(v == r, ((g - b) / safe_c) % 6, torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = torch.where(c > 0, h / 6.0, torch.zeros_like(h))
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    return h, s, v


def pixel_colours(rgb: Tensor, rule: ColourRule = ColourRule()) -> Tensor:
    """rgb (N, 3, P) in [0, 1] -> colour id per pixel (N, P); white by saturation, else nearest hue."""
    ids, ref = _reference_hues()
    h, s, _ = _hue_saturation(rgb.double())
    dist = (h.unsqueeze(-1) - ref).abs()  # (N, P, K)
    dist = torch.minimum(dist, 1.0 - dist)  # hue is circular
    nearest = ids[dist.argmin(-1)]  # (N, P)
    white = fashion.COLOUR_NAMES.index("white")
    return torch.where(s < rule.white_saturation, torch.full_like(nearest, white), nearest)


def colour_votes(images: Tensor, rule: ColourRule = ColourRule()) -> tuple[Tensor, Tensor]:
    """(N, 3, H, W) in [-1, 1] -> (brightness-weighted colour vote shares (N, 8), foreground pixels (N,))."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"colour needs RGB images (N, 3, H, W), got {tuple(images.shape)}")
    rgb = images.detach().double().clamp(-1, 1).add(1).div(2).flatten(2)  # (N, 3, P) in [0, 1]
    value = rgb.max(1).values  # (N, P)
    fg = value >= rule.fg_threshold
    weight = torch.where(fg, value, torch.zeros_like(value))
    votes = torch.zeros(len(images), len(fashion.COLOUR_NAMES), dtype=torch.float64)
    votes.scatter_add_(1, pixel_colours(rgb, rule), weight)  # (N, 8)
    return votes / votes.sum(1, keepdim=True).clamp_min(1e-12), fg.sum(1)


def read_colours(images: Tensor, rule: ColourRule = ColourRule()) -> tuple[Tensor, Tensor]:
    """(N, 3, H, W) in [-1, 1] -> (colour id (N,) with UNKNOWN = -1, winning vote share (N,))."""
    shares, n_fg = colour_votes(images, rule)
    share, winner = shares.max(1)
    ok = (share >= rule.min_agreement) & (n_fg >= rule.min_pixels)
    return torch.where(ok, winner, torch.full_like(winner, UNKNOWN)), torch.where(ok, share, torch.zeros_like(share))


@dataclass
class AlignmentResult:
    """Per-image verdicts (all (N,)); `summary()` aggregates them, seen and held-out combinations apart."""

    items: Tensor  # prompted item ids
    colours: Tensor  # prompted colour ids
    item_pred: Tensor
    colour_pred: Tensor  # UNKNOWN = -1 when the colour cannot be read
    item_ok: Tensor
    colour_ok: Tensor
    both_ok: Tensor
    heldout: Tensor  # bool: (item, colour) is in fashion.HELDOUT

    def summary(self) -> dict[str, float | int | None]:
        def mean(x: Tensor, mask: Tensor) -> float | None:
            return float(x[mask].float().mean()) if bool(mask.any()) else None

        every, seen, held = torch.ones_like(self.heldout), ~self.heldout, self.heldout
        return {
            "item": mean(self.item_ok, every),
            "colour": mean(self.colour_ok, every),
            "both": mean(self.both_ok, every),
            "both_seen": mean(self.both_ok, seen),
            "both_heldout": mean(self.both_ok, held),
            "item_heldout": mean(self.item_ok, held),
            "colour_heldout": mean(self.colour_ok, held),
            "n": int(len(self.items)),
            "n_heldout": int(held.sum()),
        }


def is_heldout(items: Tensor, colours: Tensor) -> Tensor:
    """(N,), (N,) -> bool (N,): the combination was never trained on."""
    return torch.tensor([(int(i), int(c)) in fashion.HELDOUT for i, c in zip(items, colours)], dtype=torch.bool)


def score_alignment(
    images: Tensor, items: Tensor, colours: Tensor, classifier, rule: ColourRule = ColourRule()
) -> AlignmentResult:
    """Score images (N, 3, H, W) in [-1, 1] generated for prompts (items (N,), colours (N,))."""
    items = torch.as_tensor(np.asarray(items)).long()
    colours = torch.as_tensor(np.asarray(colours)).long()
    if not (len(images) == len(items) == len(colours)):
        raise ValueError(f"{len(images)} images but {len(items)} items and {len(colours)} colours")
    item_pred = classifier.predict(images) if len(images) else torch.zeros(0, dtype=torch.long)
    colour_pred, _ = read_colours(images, rule) if len(images) else (torch.zeros(0, dtype=torch.long), None)
    item_ok, colour_ok = item_pred == items, colour_pred == colours
    return AlignmentResult(
        items, colours, item_pred, colour_pred, item_ok, colour_ok, item_ok & colour_ok, is_heldout(items, colours)
    )
