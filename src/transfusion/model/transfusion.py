"""The Transfusion network: text embeddings + patch encodings -> one transformer -> LM logits + noise prediction.

    h = embed(tokens) at text positions, patch_encoder(x_t, t) at image positions    (B, L, dim)
    h = blocks(h, mask)                     causal + bidirectional within images (masks.py)
    logits = lm_head(norm(h))[logits_mask]  (n_sel, V)
    diffusion = patch_decoder(h[image positions])  (P, D): eps or v, as diffusion.prediction says

The network is f(tokens, x_t, t); the diffusion process (noising, sampling) lives in transfusion.diffusion and
the objective in transfusion.losses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from transfusion.config import AttentionMask, ModelConfig
from transfusion.model.decoder import DecoderLM
from transfusion.model.kv_cache import KVCache
from transfusion.model.patch import build_patch_encoder


class ModelOutput(NamedTuple):
    """A NamedTuple, hence a pytree: FSDP2 finds the output tensors to hook the root's pre-backward unshard on."""

    logits: Tensor  # (n_sel, V) at logits_mask positions, or (B, L, V) when no mask was given
    diffusion: Tensor  # (P, D) at the image positions, reading order: predicted eps, or v (diffusion.prediction)


class Transfusion(DecoderLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.vocab_size, image_layers=build_patch_encoder(cfg))

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        self.patch.init_weights(self.cfg.init_std)

    def forward(
        self,
        tokens: Tensor,  # (B, L) long
        image_ids: Tensor,  # (B, L) long, -1 = text
        doc_ids: Tensor,  # (B, L) long
        positions: Tensor,  # (B, L) long
        x_t: Tensor,  # (P, D) noisy patches at the positions with image_ids >= 0
        t: Tensor,  # (P,) long timestep of each patch
        logits_mask: Tensor | None = None,  # (B, L) bool: where to compute LM logits
        cache: KVCache | None = None,
        commit: bool = True,  # with a cache: keep these positions in it (False for diffusion steps)
    ) -> ModelOutput:
        is_img = image_ids >= 0  # (B, L)
        h = self.tok_emb(tokens.masked_fill(is_img, 0))  # (B, L, dim); patch slots overwritten below
        # The encoder runs even when P == 0 so every rank calls every module each step (FSDP needs SPMD).
        patch_h, patch_ctx = self.patch.encode(x_t, t)  # (P, dim), encoder state for decode
        patch_h = patch_h.to(h.dtype)
        h = h.masked_scatter(is_img.unsqueeze(-1), patch_h)
        mask = self._mask(image_ids, doc_ids, cache)
        rope = self.rope(positions)
        for block in self.layers:
            h = block(h, rope, mask, cache)
        if cache is not None and commit:
            cache.commit(tokens.shape[1])
        h_out = self.norm(h)
        text_h = h_out if logits_mask is None else h_out[logits_mask]  # (B, L, dim) or (n_sel, dim)
        patch_out = (h_out if self.cfg.patch_out_norm else h)[is_img]  # model.patch_out_norm: normed or raw stream
        pred = self.patch.decode(patch_out, patch_ctx)  # (P, D)
        return ModelOutput(logits=self.lm_head(text_h), diffusion=pred)

    def _mask(self, image_ids: Tensor, doc_ids: Tensor, cache: KVCache | None):
        return self.attention_mask(image_ids, doc_ids, cache, self.cfg.attention_mask == AttentionMask.TRANSFUSION)
