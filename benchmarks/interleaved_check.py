"""Does a model trained on interleaved documents write them itself? Measured, not eyeballed.

    python benchmarks/interleaved_check.py --ckpt runs/interleaved --n 48 --out benchmarks/results/interleaved.json

For n colour-fashion prompts written as the opening of an interleaved document ("two items: a red sneaker",
"first a blue bag", "a green dress": the first halves of data/colour_fashion.py's INTERLEAVED_TEMPLATES, with
no "<boi>"), free generation (decoding.generate_batch, greedy text, the checkpoint's sampler) is scored on:
  - emitted_boi: the model opened an image itself after the prompt;
  - text_after_eoi: it went on writing after that image;
  - second_image: it opened a second image;
  - first_both: the first image shows the prompted item and colour (the eval suite's classifier + colour reader);
  - second_both: the second image shows the item and colour the model itself wrote before it (parsed from its
    text; a second image after text that names no item or colour counts as wrong).
Also writes a grid PNG: per document, the first and the second image (black when absent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from transfusion.backends import setup_process
from transfusion.data import fashion
from transfusion.data.colour_fashion import INTERLEAVED_TEMPLATES
from transfusion.decoding import generate_batch, sampling_args
from transfusion.diffusion import build_schedule
from transfusion.evaluate.alignment import score_alignment
from transfusion.evaluate.cider import parse_caption
from transfusion.evaluate.classifier import get_classifier
from transfusion.inference import load
from transfusion.metrics import save_image_grid


def prompts(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = rng.integers(len(fashion.ITEMS), size=n)
    colours = rng.integers(len(fashion.COLOUR_NAMES), size=n)
    openings = [INTERLEAVED_TEMPLATES[k % len(INTERLEAVED_TEMPLATES)][0] for k in range(n)]
    texts = [o.format(a=fashion.caption(int(i), int(c))) for o, i, c in zip(openings, items, colours)]
    return texts, items, colours


def rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def check(ckpt: str, n: int, seed: int, max_new_tokens: int, out_grid: Path | None) -> dict:
    m = load(ckpt)
    setup_process(m.config.runtime)
    texts, items, colours = prompts(n, seed)
    with torch.no_grad():
        docs = generate_batch(m.model, m.tokenizer, texts, build_schedule(m.config.diffusion),
                              max_new_tokens=max_new_tokens, max_images=2,
                              generators=[torch.Generator().manual_seed(seed + k) for k in range(n)],
                              **sampling_args(m.config.diffusion))
    clf = get_classifier(progress=False)
    c = m.config.model
    blank = torch.full((c.image_channels, c.image_size, c.image_size), -1.0)
    firsts, seconds, boi, after, two, wrote, examples = [], [], [], [], [], [], []
    for k, parts in enumerate(docs):
        at = [j for j, p in enumerate(parts) if isinstance(p, torch.Tensor)]  # where the images are
        imgs = [parts[j] for j in at]
        first_at = at[0] if at else None
        boi.append(first_at is not None)
        text_after = "".join(p for p in parts[first_at + 1:] if isinstance(p, str)) if first_at is not None else ""
        after.append(bool(text_after.strip()))
        two.append(len(imgs) >= 2)
        if len(imgs) >= 2:  # what the model wrote between its images names the second one
            wrote.append(parse_caption("".join(str(p) for p in parts[at[0] + 1:at[1]])))
        firsts.append(imgs[0] if imgs else blank)
        seconds.append(imgs[1] if len(imgs) >= 2 else blank)
        if k < 12:
            examples.append("".join(p if isinstance(p, str) else " <image> " for p in [texts[k], *parts]))
    have_first = torch.tensor(boi)
    first = score_alignment(torch.stack(firsts), torch.as_tensor(items), torch.as_tensor(colours), clf)
    first_both = [bool(b) and bool(h) for b, h in zip(first.both_ok, have_first)]
    second_both: list[bool] = []
    sec_idx = [k for k in range(n) if two[k]]
    if sec_idx:
        w_items = torch.tensor([it for it, _ in wrote])
        w_cols = torch.tensor([co for _, co in wrote])
        sec = score_alignment(torch.stack([seconds[k] for k in sec_idx]), w_items, w_cols, clf)
        second_both = [bool(b) and int(it) >= 0 and int(co) >= 0 for b, it, co in zip(sec.both_ok, w_items, w_cols)]
    if out_grid is not None:
        grid = torch.stack([x for pair in zip(firsts, seconds) for x in pair])
        save_image_grid(grid, out_grid, nrow=8, scale=3)
    return {"ckpt": str(m.path), "n": n, "seed": seed, "max_new_tokens": max_new_tokens,
            "emitted_boi": rate(boi), "text_after_eoi": rate(after), "second_image": rate(two),
            "first_both": rate(first_both), "second_both_of_documents_with_two": rate(second_both),
            "n_two_images": len(sec_idx), "examples": examples,
            "grid": str(out_grid) if out_grid else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    grid = Path(a.out).with_suffix(".png") if a.out else None
    res = check(a.ckpt, a.n, a.seed, a.max_new_tokens, grid)
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
