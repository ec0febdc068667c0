"""Does each half of the model read the other through the patch encoder/decoder? (docs/results.md, Table 5)

    python benchmarks/encoder_probe.py RUN_OR_CHECKPOINT [...] [--n 32] [--out probe.json]

For a colour-fashion Transfusion run (raw weights, 32 real test images with their captions):
  decoder_reads_caption   relative change of the diffusion prediction when every image gets another image's
                          caption (the captions rolled by one), at t = 900 / 500 / 100: does the image side
                          read the text through the transformer? (0 = the prediction ignores the caption)
  decoder_reads_h         the same when the decoder gets another image's transformer output at the image
                          positions (U-Net: its skip activations stay this image's)
  lm_prefers_right_colour teacher-forced caption NLL after `BOS BOI image EOI`: share of images whose own caption
                          beats the same caption with the colour word swapped (chance 0.5): does the text side
                          read the image through the encoder?
  encoder_colour_change   relative change of the encoder output when 16 items are recoloured red -> blue (t = 100)
  encoder_constant_share  |mean over all image positions| / mean |h|: 1 = every position gets the same vector
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import image_documents, real_test_patches  # noqa: E402
from transfusion.images import patchify  # noqa: E402


def _caption_first(tk, captions: list[str], n_patches: int):  # BOS caption BOI <image>
    return image_documents([[tk.bos_id] + tk.encode(c) + [tk.boi_id] for c in captions], [[] for _ in captions],
                           n_patches, tk.pad_id)[:4]


def _image_first(tk, captions: list[str], n_patches: int):  # BOS BOI <image> EOI caption EOS, + targets
    return image_documents([[tk.bos_id, tk.boi_id] for _ in captions],
                           [[tk.eoi_id] + tk.encode(c) + [tk.eos_id] for c in captions], n_patches, tk.pad_id)


@torch.no_grad()
def probe(run: str, n: int) -> dict:
    m, ex, sch, x0 = real_test_patches(run, n, use_ema=False, check=False)  # x0 (n, P, D)
    model, cfg, tk = m.model, m.config, m.tokenizer
    mc = cfg.model
    _, P, D = x0.shape
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).reshape(-1, D)
    roll = torch.roll(torch.arange(n), 1)
    out: dict = {"run": run, "encoder": mc.patch_encoder.value}

    seen: dict = {}
    decode = model.patch.decode
    model.patch.decode = lambda h, ctx: seen.update(h=h, ctx=ctx) or decode(h, ctx)
    own = _caption_first(tk, ex.captions, P)
    other = _caption_first(tk, [ex.captions[i] for i in roll], P)
    for t_val in (900, 500, 100):
        t = torch.full((n * P,), t_val)
        x_t = sch.add_noise(x0.reshape(-1, D), eps, t)
        pred = model(*own, x_t, t).diffusion.float()
        h, ctx = seen["h"], seen["ctx"]
        rel = lambda a: round(float((a.float() - pred).pow(2).mean().sqrt() / pred.pow(2).mean().sqrt()), 4)
        out[f"decoder_reads_caption_t{t_val}"] = rel(model(*other, x_t, t).diffusion)
        out[f"decoder_reads_h_t{t_val}"] = rel(decode(h.view(n, P, -1)[roll].reshape(n * P, -1), ctx))
    model.patch.decode = decode

    colours = sorted({w for cap in ex.captions for w in re.findall(r"[a-z]+", cap)} &
                     {"red", "green", "blue", "yellow", "white", "purple", "orange", "cyan", "pink"})
    def swapped(cap: str) -> str:
        for w in colours:
            if re.search(rf"\b{w}\b", cap):
                return re.sub(rf"\b{w}\b", colours[(colours.index(w) + 1) % len(colours)], cap)
        return cap
    def nll(caps: list[str]) -> torch.Tensor:  # (n,)
        tokens, image_ids, doc_ids, positions, targets = _image_first(tk, caps, P)
        logits = model(tokens, image_ids, doc_ids, positions, x0.reshape(-1, D),
                       torch.zeros(n * P, dtype=torch.long)).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return -(logp * targets[:, :-1]).sum(1)
    out["lm_prefers_right_colour"] = round(float((nll(ex.captions) < nll([swapped(c) for c in ex.captions]))
                                                 .float().mean()), 4)

    gray = ex.images[:16].float().mean(1)  # (16, H, W) in [-1, 1]: the item's shape
    mask = (gray + 1) / 2
    red = torch.stack([mask, torch.zeros_like(mask), torch.zeros_like(mask)], 1) * 2 - 1
    blue = torch.stack([torch.zeros_like(mask), torch.zeros_like(mask), mask], 1) * 2 - 1
    def enc(img: torch.Tensor) -> torch.Tensor:
        p = patchify(img, mc.patch_size).reshape(-1, D)
        return model.patch.encode(p, torch.full((p.shape[0],), 100))[0].float()
    base = enc(red)
    out["encoder_colour_change"] = round(float((enc(blue) - base).norm(dim=-1).mean() / base.norm(dim=-1).mean()), 4)
    out["encoder_constant_share"] = round(float(base.mean(0).norm() / base.norm(dim=-1).mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = [probe(r, args.n) for r in args.runs]
    for r in results:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
