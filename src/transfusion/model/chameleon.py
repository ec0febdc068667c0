"""The Chameleon baseline network (paper §4.1 "Baseline"; Chameleon Team 2024): one decoder-only transformer
over a single vocabulary of text tokens and VQ-VAE image codes.

    vocabulary   [0, vocab_size) text (the tokenizer's ids)   [vocab_size, vocab_size + codebook_size) image codes
    h = embed(tokens)                        (B, L, dim)
    h = blocks(h, causal mask within documents)        no bidirectional span: an image is a token sequence
    logits = lm_head(norm(h))[logits_mask]   (n_sel, vocab_size + codebook_size)

The same blocks as Transfusion (transformer.py), so the families differ only in how images enter and leave;
the paper's stability changes (model.qk_norm, model.post_norm, train.z_loss) are options of those blocks and of
the loss, set in configs/*chameleon*.toml. Architecture only: tokens come from chameleon/data.py, the objective
is losses.chameleon_loss, decoding is chameleon/decoding.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transfusion.config import ModelConfig
from transfusion.model.decoder import DecoderLM
from transfusion.model.kv_cache import KVCache


class Chameleon(DecoderLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.vocab_size + cfg.codebook_size)
        self.total_vocab = cfg.vocab_size + cfg.codebook_size

    def forward(
        self,
        tokens: Tensor,  # (B, L) long: text ids and image codes (offset by vocab_size)
        doc_ids: Tensor,  # (B, L) long
        positions: Tensor,  # (B, L) long
        logits_mask: Tensor | None = None,  # (B, L) bool: where to compute logits
        cache: KVCache | None = None,
    ) -> Tensor:
        """-> logits (n_sel, V + K) at logits_mask positions, or (B, L, V + K) without a mask."""
        h = self.tok_emb(tokens)  # (B, L, dim)
        mask = self._mask(doc_ids, cache)
        rope = self.rope(positions)
        for block in self.layers:
            h = block(h, rope, mask, cache)
        if cache is not None:
            cache.commit(tokens.shape[1])
        h = self.norm(h)
        return self.lm_head(h if logits_mask is None else h[logits_mask])

    def _mask(self, doc_ids: Tensor, cache: KVCache | None):
        """Causal within documents: the masks.py rule with no image spans (every image id -1)."""
        return self.attention_mask(torch.full_like(doc_ids, -1), doc_ids, cache, bidirectional=False)
