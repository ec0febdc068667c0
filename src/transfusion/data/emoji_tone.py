"""Read an emoji's skin tone off its pixels: an exact scorer, no training.

Both styles paint skin with one flat colour per tone (plus shading and outlines). `SKIN` holds those colours,
measured once on the full prepared data: per style, the most frequent colour of the pixels that differ between
the six tone variants of one emoji (constants, so the scorer needs no data and cannot drift). A pixel votes for
the tone of the nearest skin colour when it lies within `MAX_DISTANCE` (RGB, 0-255) of it; the image's tone is
the tone with most votes, -1 when no pixel votes.

Measured on every real skin-toned image of the full data (3,876 images: 646 emoji-style pairs x 6 tones),
composited on white as in training: 96.8% at 32x32, 98.4% at 64x64 (the test split's 397: 97.2% / 99.2%; the
committed subset's 192: 98.4% / 100%). The errors are mostly medium-light read as light or medium (the two
styles' palettes overlap there). It is meaningful only for emoji that have skin tones (tone label -1
elsewhere): the caller scores tone on those prompts only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transfusion.images import to_uint8

# (style, tone) -> RGB of the skin; tone order as emoji_prepare.TONES (none = the default yellow)
SKIN: dict[str, tuple[tuple[int, int, int], ...]] = {
    "google": ((255, 202, 40), (249, 221, 189), (224, 187, 149), (186, 141, 104), (165, 108, 67), (112, 83, 74)),
    "twitter": ((255, 220, 93), (247, 222, 206), (243, 210, 162), (212, 171, 136), (175, 126, 87), (124, 83, 62)),
}
MAX_DISTANCE = 10.0  # measured: 6-12 change accuracy by < 0.3 points at 32x32; 10 tolerates some colour drift
N_TONES = 6


def _palette() -> tuple[Tensor, Tensor]:
    """(R, 3) float reference colours and (R,) their tone index."""
    colours = [c for style in sorted(SKIN) for c in SKIN[style]]
    tones = [t for _ in sorted(SKIN) for t in range(N_TONES)]
    return torch.tensor(colours, dtype=torch.float32), torch.tensor(tones, dtype=torch.long)


def tone_votes(images: Tensor) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 6) how many pixels lie near each tone's skin colour."""
    refs, tones = _palette()
    px = torch.from_numpy(to_uint8(images)).float().flatten(1, 2)  # (N, H*W, 3) in 0..255
    dist = torch.cdist(px, refs.expand(len(px), -1, -1))  # (N, H*W, R)
    best, nearest = dist.min(-1)  # (N, H*W)
    votes = torch.zeros(len(px), N_TONES)
    hit = (best <= MAX_DISTANCE).float()
    votes.scatter_add_(1, tones[nearest], hit)  # each close pixel adds 1 to its tone
    return votes


def read_tone(images: Tensor) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N,) long tone index (emoji_prepare.TONES), -1 when no skin is found."""
    votes = tone_votes(images)
    pred = votes.argmax(1)
    return torch.where(votes.sum(1) > 0, pred, torch.full_like(pred, -1))
