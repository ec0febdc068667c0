"""Text scores by model likelihood: perplexity on the held-out Shakespeare plays (data/shakespeare.HELDOUT_PLAYS,
never seen by the tokenizer or the trainer).

The held-out token stream is cut into non-overlapping windows of `window - 1` tokens, each preceded by BOS (as
training documents are), and every window token is scored given its window prefix. Perplexity =
exp(mean negative log-likelihood per token). It depends on the tokenizer: compare runs sharing one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.config import Family


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token (nats)
    n_tokens: int
    n_windows: int


def text_forward_logprobs(model, tokens: Tensor) -> Tensor:
    """Log-probs of tokens[:, 1:] given their prefixes, for text-only rows (B, L) -> (B, L - 1)."""
    B, L = tokens.shape
    device = model.tok_emb.weight.device
    tokens = tokens.to(device)
    no_img = torch.full((B, L), -1, dtype=torch.long, device=device)
    doc = torch.zeros((B, L), dtype=torch.long, device=device)
    pos = torch.arange(L, device=device).expand(B, L)
    if model.cfg.family == Family.CHAMELEON:
        logits = model(tokens, doc, pos)  # (B, L, V + K): the text token's probability under the whole vocabulary
    else:
        D = model.cfg.patch_dim
        logits = model(tokens, no_img, doc, pos, torch.zeros(0, D, device=device),
                       torch.zeros(0, dtype=torch.long, device=device)).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, L-1)


@torch.no_grad()
def perplexity(
    model, ids: np.ndarray, bos_id: int, window: int = 256, max_tokens: int | None = None, batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a token stream `ids` (n,) in BOS-prefixed windows of `window` positions."""
    from tqdm.auto import tqdm

    window = min(window, model.cfg.max_seq_len)
    body = window - 1
    ids = np.asarray(ids, dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = len(ids) // body + (1 if len(ids) % body else 0)
    if n_windows == 0:
        raise ValueError("no tokens to score")
    total_nll, total_tokens = 0.0, 0
    starts = list(range(0, len(ids), body))
    for k in tqdm(range(0, len(starts), batch_size), desc="perplexity", disable=not progress, leave=False):
        chunk = [ids[s : s + body] for s in starts[k : k + batch_size]]
        lengths = [len(c) for c in chunk]
        rows = torch.zeros(len(chunk), 1 + max(lengths), dtype=torch.long)  # pad with 0: never scored
        rows[:, 0] = bos_id
        for r, c in enumerate(chunk):
            rows[r, 1 : 1 + len(c)] = torch.from_numpy(c)
        logp = text_forward_logprobs(model, rows).cpu()  # (b, max_len)
        valid = torch.arange(logp.shape[1])[None, :] < torch.tensor(lengths)[:, None]
        total_nll -= float(logp[valid].double().sum())
        total_tokens += int(valid.sum())
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, total_tokens, n_windows)


def heldout_perplexity(model, tokenizer, max_tokens: int | None = None, window: int = 256,
                       progress: bool = False, data=None) -> PerplexityResult:
    """Perplexity on the held-out text (first `max_tokens` tokens of it when given): the test split of the
    config's text source `data` (data.text_files, data/text_files.py), the held-out plays without one."""
    from transfusion.config import DataConfig
    from transfusion.data.text_files import text_corpus

    corpus = text_corpus(data or DataConfig(), tokenizer, "test")
    return perplexity(model, corpus.ids, tokenizer.bos_id, window, max_tokens, progress=progress)
