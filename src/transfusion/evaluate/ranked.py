"""Ranked classification by model likelihood (in the spirit of the Llama eval suite's multiple choice): for a
real image, which caption among the candidates does the model find most likely?

Each candidate is scored in the image-first layout the model trains on, with a clean image (t = 0):

    BOS BOI <patches> EOI caption EOS          score = sum of log p(caption tokens and EOS | prefix)

Candidates are the dataset's captions (evaluate/eval_set.py: for colour fashion the canonical "a {colour} {item}"
over all 80 combinations, so chance is 1/80; for larger datasets the right caption and 99 others); where the
dataset defines attributes, how often the chosen caption names each right is reported too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


def ranked_retrieval(model, tokenizer, images: Tensor, truth: list[str], candidates: list[list[str]],
                     labels: dict[str, Tensor] | None = None, parse=None, progress: bool = False) -> dict:
    """Pick the most likely of candidates[i] for each image (N, C, H, W); compare with truth[i].

    Returns {accuracy, <attribute> for each of `labels` (the chosen caption names the right value, by
    `parse` = Dataset.parse_caption), n, n_candidates}."""
    from tqdm.auto import tqdm

    labels = labels or {}
    chosen = []
    for img, cands in tqdm(list(zip(images, candidates)), desc="ranked", disable=not progress, leave=False):
        chosen.append(cands[int(caption_logprobs(model, tokenizer, img, cands).argmax())])
    n = max(len(images), 1)
    out: dict = {"accuracy": sum(c == t for c, t in zip(chosen, truth)) / n}
    if labels and parse is not None:
        from transfusion.evaluate.attributes import parsed_labels, summarise

        scores = summarise(labels, parsed_labels(chosen, parse, list(labels)))
        out.update({name: scores[name] for name in labels})
    out.update(n=len(images), n_candidates=max((len(c) for c in candidates), default=0))
    return out
