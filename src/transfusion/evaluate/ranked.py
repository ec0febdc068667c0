"""Ranked classification by model likelihood (in the spirit of the Llama eval suite's multiple choice): for a
real image, which caption among the candidates does the model find most likely?

Each candidate is scored in the image-first layout the model trains on, with a clean image (t = 0):

    BOS BOI <patches> EOI caption EOS          score = sum of log p(caption tokens and EOS | prefix)

Candidates are one template (default "a {colour} {item}") over all 80 item/colour combinations, so chance is
1/80; item and colour accuracy of the chosen caption are reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.data import fashion

COMBOS: tuple[tuple[int, int], ...] = tuple(
    (i, c) for i in range(len(fashion.ITEMS)) for c in range(len(fashion.COLOUR_NAMES))
)


@dataclass
class RankedResult:
    accuracy: float  # chosen caption is exactly the right item and colour
    item: float
    colour: float
    n: int
    n_candidates: int


@torch.no_grad()
def caption_logprobs(model, tokenizer, image: Tensor, captions: list[str]) -> Tensor:
    """Sum log-prob of each caption (+ EOS) after `BOS BOI image EOI`; image (C, H, W) in [-1, 1] -> (K,).

    The image prefix runs once; its KV cache is then copied to one row per candidate and the candidates are
    teacher-forced token by token in lock-step (shorter ones padded at the end, which cannot affect their
    scores under the causal mask).
    """
    from transfusion.decoding import Decoder

    tk = tokenizer
    seqs = [tk.encode(c) + [tk.eos_id] for c in captions]
    K, T = len(seqs), max(len(s) for s in seqs)
    targets = torch.full((K, T), tk.pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        targets[r, : len(s)] = torch.tensor(s)
    valid = targets != tk.pad_id  # (K, T); no caption contains PAD
    dec = Decoder(model, 1, tk.pad_id, max_len=3 + model.cfg.patches_per_image + T)
    logits = dec.prefill([[[tk.bos_id, tk.boi_id], image, [tk.eoi_id]]])  # (1, V)
    dec.select_rows(torch.zeros(K, dtype=torch.long))  # one copy of the prefix per candidate
    logits = logits.expand(K, -1)
    total = torch.zeros(K, dtype=torch.float64)
    for j in range(T):
        logp = F.log_softmax(logits.float(), dim=-1).cpu()  # (K, V)
        total += torch.where(valid[:, j], logp.gather(1, targets[:, j : j + 1]).squeeze(1), 0.0).double()
        if j + 1 < T:
            logits = dec.append_tokens(targets[:, j].to(dec.device))
    return total


def ranked_accuracy(
    model, tokenizer, images: Tensor, items: Tensor, colours: Tensor, template: int = 0, progress: bool = False
) -> RankedResult:
    """Pick the most likely of the 80 template captions for each image (N, C, H, W); compare with the truth."""
    from tqdm.auto import tqdm

    captions = [fashion.caption(i, c, template) for i, c in COMBOS]
    combos = torch.tensor(COMBOS)  # (80, 2)
    right = item_ok = colour_ok = 0
    for img, i, c in tqdm(list(zip(images, items.tolist(), colours.tolist())), desc="ranked",
                          disable=not progress, leave=False):
        best = combos[int(caption_logprobs(model, tokenizer, img, captions).argmax())]
        item_ok += int(best[0]) == i
        colour_ok += int(best[1]) == c
        right += int(best[0]) == i and int(best[1]) == c
    n = max(len(images), 1)
    return RankedResult(right / n, item_ok / n, colour_ok / n, len(images), len(captions))
