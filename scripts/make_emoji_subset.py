"""Write src/transfusion/assets/emoji_subset.npz: a small slice of the prepared emoji data for tests and CI.

    .venv/bin/python scripts/make_emoji_subset.py [--toneable 10] [--others 260]

Needs the prepared data (`make data`, scripts/get_emoji.py). Same format as the prepared file (64x64, all
attributes), so data/emoji.py reads either the same way and every record keeps its train/test side (a hash of
its key). Holds: every image of the held-out gestures (6 gestures x 6 tones x 2 styles) and of the held-out
(emoji, style) emoji in both styles, all 6 tones of `--toneable` more skin-toned emoji per style, and
`--others` random other images. Deterministic (fixed seed). Licences: assets/NOTICE.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from transfusion.data.emoji import HELDOUT_STYLE, HELDOUT_TONE, SUBSET_PATH, prepared_path
from transfusion.data.emoji_prepare import FIELDS, save_prepared

SEED = 20240811  # arXiv 2408.11039


def choose(z: dict[str, np.ndarray], n_toneable: int, n_others: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted record indices of the subset (see the module docstring)."""
    name, toneable = z["name"].astype(str), z["toneable"].astype(bool)
    named = {g for g, _ in HELDOUT_TONE} | {e for e, _ in HELDOUT_STYLE}
    must = np.flatnonzero(np.isin(name, sorted(named)))
    missing = named - set(name[must].tolist())
    if missing:
        raise SystemExit(f"held-out emoji missing from the prepared data: {sorted(missing)}")
    extra_names = sorted(set(name[toneable].tolist()) - named)
    extra = rng.choice(extra_names, size=min(n_toneable, len(extra_names)), replace=False)
    tone_idx = np.flatnonzero(np.isin(name, extra))
    rest = np.setdiff1d(np.arange(len(name)), np.concatenate([must, tone_idx]))
    rest = rest[~toneable[rest]]  # skin-toned emoji come as whole 6-tone groups above
    others = rng.choice(rest, size=min(n_others, len(rest)), replace=False)
    return np.unique(np.concatenate([must, tone_idx, others]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toneable", type=int, default=10, help="extra skin-toned emoji, all tones, both styles")
    ap.add_argument("--others", type=int, default=260, help="random other images")
    ap.add_argument("--out", type=Path, default=SUBSET_PATH)
    args = ap.parse_args()
    with np.load(prepared_path(), allow_pickle=False) as f:
        z = {k: f[k] for k in f.files}
    idx = choose(z, args.toneable, args.others, np.random.default_rng(SEED))
    records = [{k: z[k][i].item() for k in FIELDS} for i in idx]
    save_prepared(args.out, z["images"][idx], records)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB; {len(idx)} images)")


if __name__ == "__main__":
    main()
