"""Decoding the Chameleon baseline: text -> image by sampling codes one by one, and image -> text.

Text -> image: `BOS caption BOI`, then n = (image_size / patch_size)**2 codes, each drawn from the logits of the
code range only (text ids are never an image token), then the VQ-VAE decodes the code grid. Classifier-free
guidance on logits (as Chameleon and Make-A-Scene): every prompt has an unconditional twin `BOS BOI` (the
caption-dropout context of training, data.caption_dropout) in the same batch, and the next code is drawn from
    logits = uncond + cfg_scale * (cond - uncond)
(a per-row constant added to either set of logits only shifts the result, so raw logits and log-probs agree),
at `temperature`, among the `top_k` most likely codes when top_k > 0. The drawn code is appended to both twins.

Image -> text: `BOS BOI codes EOI`, then greedy (or tempered) text until EOS; codes, BOI, EOI, BOS and PAD are
banned in the caption.

Rows of different lengths are left-padded into one KV cache; the padding is its own document, so the mask hides
it, and RoPE positions start at 0 where the real row starts (as decoding.py does for Transfusion).
"""

from __future__ import annotations

import torch
from torch import Tensor

from transfusion.chameleon.vq import Quantizer
from transfusion.decoding import GenerationError, TokenizerLike
from transfusion.model.chameleon import Chameleon


class TokenDecoder:
    """A batch of token rows in one KV cache: `prefill` left-padded prompts, then `append` one token per row."""

    def __init__(self, model: Chameleon, rows: list[list[int]], pad_id: int, new_tokens: int):
        self.model = model
        self.device = model.tok_emb.weight.device
        width = max(len(r) for r in rows)
        if width + new_tokens > model.cfg.max_seq_len:
            raise GenerationError(f"{width} prompt + {new_tokens} new tokens > model.max_seq_len "
                                  f"{model.cfg.max_seq_len}")
        B = len(rows)
        tokens = torch.full((B, width), pad_id, dtype=torch.long)
        doc_ids = torch.zeros((B, width), dtype=torch.long)  # 0: left padding, 1: the row
        positions = torch.zeros((B, width), dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, width - len(r):] = torch.tensor(r)
            doc_ids[b, width - len(r):] = 1
            positions[b, width - len(r):] = torch.arange(len(r))
        self.next_pos = torch.tensor([len(r) for r in rows], device=self.device)  # (B,)
        self.cache = model.new_cache(B, width + new_tokens)
        self._prefill = (tokens.to(self.device), doc_ids.to(self.device), positions.to(self.device))

    def prefill(self) -> Tensor:
        tokens, doc_ids, positions = self._prefill
        last = torch.zeros_like(tokens, dtype=torch.bool)
        last[:, -1] = True
        return self.model(tokens, doc_ids, positions, logits_mask=last, cache=self.cache)  # (B, V + K)

    def append(self, tokens: Tensor) -> Tensor:
        """(B,) next tokens -> (B, V + K) logits after them."""
        B = tokens.shape[0]
        doc = torch.ones((B, 1), dtype=torch.long, device=self.device)
        logits = self.model(tokens[:, None], doc, self.next_pos[:, None], cache=self.cache)  # (B, 1, V + K)
        self.next_pos = self.next_pos + 1
        return logits[:, -1]


def sample_logits(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    """(B, K) -> (B,): greedy at temperature 0, else softmax(logits / T) over the top_k (0: all) entries."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate_images(model: Chameleon, tokenizer: TokenizerLike, vq: Quantizer, prompts: list[str],
                    cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0,
                    generator: torch.Generator | None = None) -> Tensor:
    """Text -> images (N, C, H, W) in [-1, 1] (module docstring)."""
    if not prompts:
        raise GenerationError("no prompt to draw: ask for at least one image")
    tk, c = tokenizer, model.cfg
    n = c.patches_per_image
    rows = [[tk.bos_id] + tk.encode(p) + [tk.boi_id] for p in prompts]
    guided = cfg_scale != 1.0
    if guided:
        rows += [[tk.bos_id, tk.boi_id]] * len(prompts)
    dec = TokenDecoder(model, rows, tk.pad_id, n)
    logits = dec.prefill()
    N = len(prompts)
    codes = torch.empty(N, n, dtype=torch.long)
    for i in range(n):
        code_logits = logits[:, c.vocab_size:].float()  # (B, K): only codes may follow BOI
        if guided:
            cond, uncond = code_logits[:N], code_logits[N:]
            code_logits = uncond + cfg_scale * (cond - uncond)
        nxt = sample_logits(code_logits, temperature, top_k, generator)  # (N,)
        codes[:, i] = nxt.cpu()
        if i < n - 1:
            tok = nxt + c.vocab_size
            logits = dec.append(torch.cat([tok, tok]) if guided else tok)
    side = c.image_size // c.patch_size
    return vq.decode_indices(codes.view(N, side, side).to(dec.device)).clamp(-1, 1)


@torch.no_grad()
def caption_images(model: Chameleon, tokenizer: TokenizerLike, vq: Quantizer, images: Tensor,
                   max_new_tokens: int = 32, temperature: float = 0.0,
                   generator: torch.Generator | None = None) -> list[str]:
    """Images (N, C, H, W) in [-1, 1] -> captions (module docstring)."""
    tk, c = tokenizer, model.cfg
    codes = vq.encode_indices(images.to(model.tok_emb.weight.device)).flatten(1) + c.vocab_size  # (N, n)
    rows = [[tk.bos_id, tk.boi_id] + r.tolist() + [tk.eoi_id] for r in codes]
    max_new_tokens = min(max_new_tokens, c.max_seq_len - len(rows[0]))
    if max_new_tokens < 1:
        raise GenerationError(f"an image of {codes.shape[1]} codes leaves no room to caption in model.max_seq_len")
    dec = TokenDecoder(model, rows, tk.pad_id, max_new_tokens)
    logits = dec.prefill()
    banned = [tk.boi_id, tk.eoi_id, tk.bos_id, tk.pad_id]
    out: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool)
    for j in range(max_new_tokens):
        text_logits = logits[:, :c.vocab_size].float()  # codes never appear in a caption
        text_logits[:, banned] = float("-inf")
        nxt = sample_logits(text_logits, temperature, 0, generator)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t == tk.eos_id
        if bool(done.all()) or j == max_new_tokens - 1:
            break
        logits = dec.append(nxt)
    return [tk.decode([i for i in r if i != tk.eos_id]).strip() for r in out]
