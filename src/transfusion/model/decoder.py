"""What both model families share (Transfusion, model/transfusion.py; the Chameleon baseline, model/chameleon.py):
a decoder-only transformer over `vocab` tokens — embedding, RoPE, the blocks of transformer.py, final norm, LM
head — with its initialisation, the attention mask of a batch or of a KV-cached step (masks.py), and the cache.

The families differ only in how images enter and leave the sequence (patches + diffusion vs VQ codes as tokens).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from transfusion.config import AttentionImpl, ModelConfig
from transfusion.model.kv_cache import KVCache
from transfusion.model.masks import dense_mask, flex_block_mask
from transfusion.model.transformer import Block, RMSNorm, RotaryEmbedding, residual_out_std


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: int, image_layers: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(vocab, cfg.dim)
        if image_layers is not None:  # registered here, before the blocks: the parameters' order predates the split
            self.patch = image_layers
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer: the model may be built on the meta device, then `to_empty`.
        A subclass initialises its own image layers after calling this (the RNG order is part of the contract)."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        self.rope.reset_parameters()
        out_std = residual_out_std(std, self.cfg.n_layers)
        for block in self.layers:
            block.init_weights(std, out_std)
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_mask(self, image_ids: Tensor, doc_ids: Tensor, cache: KVCache | None, bidirectional: bool):
        """The masks.py rule for a batch (dense bool, or a FlexAttention BlockMask with attention_impl = flex), or
        for the new positions of a KV-cached step against everything cached (dense)."""
        if cache is not None:
            start = cache.length
            all_img, all_doc = cache.begin(image_ids, doc_ids)
            return dense_mask(all_img, all_doc, q_start=start, bidirectional=bidirectional)
        if self.cfg.attention_impl == AttentionImpl.FLEX:
            return flex_block_mask(image_ids, doc_ids, bidirectional)
        return dense_mask(image_ids, doc_ids, bidirectional=bidirectional)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(
            self.cfg.n_layers, batch, self.cfg.n_heads, self.cfg.head_dim, max_len or self.cfg.max_seq_len,
            device=p.device, dtype=dtype or p.dtype,
        )
