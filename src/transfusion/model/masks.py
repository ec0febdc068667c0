"""The Transfusion attention mask, defined once (paper §3.3, Fig. 4).

Rule for query position q and key position k of the same row:

    allowed(q, k) = same_document(q, k) and (k <= q  or  same_image(q, k))

i.e. causal everywhere, plus bidirectional among the patches of one image, and never across the documents
packed into one row. The plain-causal ablation (paper Table 5) drops the `same_image` term.

`mask_rule` evaluates that rule on broadcastable index tensors; the dense bool mask (for
`scaled_dot_product_attention`, including the KV-cached case where queries are a suffix) and the FlexAttention
`mask_mod` both call it, so the two paths cannot drift apart.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def mask_rule(
    q_idx: Tensor, k_idx: Tensor, q_img: Tensor, k_img: Tensor, q_doc: Tensor, k_doc: Tensor, bidirectional: bool
) -> Tensor:
    """True where query q may attend to key k. All arguments broadcast against each other."""
    allowed = k_idx <= q_idx
    if bidirectional:
        allowed = allowed | ((q_img == k_img) & (q_img >= 0))
    return allowed & (q_doc == k_doc)


def transfusion_mask(image_ids: Tensor, doc_ids: Tensor | None = None, bidirectional: bool = True) -> Tensor:
    """(L,) image ids (-1 text, k >= 0 image k) [+ (L,) doc ids] -> (L, L) bool, True = may attend."""
    L = image_ids.shape[-1]
    idx = torch.arange(L, device=image_ids.device)
    docs = torch.zeros_like(image_ids) if doc_ids is None else doc_ids
    return mask_rule(idx[:, None], idx[None, :], image_ids[:, None], image_ids[None, :], docs[:, None],
                     docs[None, :], bidirectional)


def dense_mask(image_ids: Tensor, doc_ids: Tensor, q_start: int = 0, bidirectional: bool = True) -> Tensor:
    """Batched mask for SDPA: (B, S) ids of all key positions -> (B, 1, S - q_start, S).

    Queries are the positions [q_start, S): q_start > 0 is the KV-cached case (keys include the cached prefix).
    """
    S = image_ids.shape[1]
    k_idx = torch.arange(S, device=image_ids.device)
    q_idx = k_idx[q_start:]
    m = mask_rule(
        q_idx[None, :, None], k_idx[None, None, :],
        image_ids[:, q_start:, None], image_ids[:, None, :],
        doc_ids[:, q_start:, None], doc_ids[:, None, :],
        bidirectional,
    )
    return m.unsqueeze(1)


def flex_mask_mod(image_ids: Tensor, doc_ids: Tensor, bidirectional: bool = True) -> Callable:
    """FlexAttention mask_mod over (B, L) ids, built from the same `mask_rule`."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_rule(q_idx, kv_idx, image_ids[b, q_idx], image_ids[b, kv_idx], doc_ids[b, q_idx],
                         doc_ids[b, kv_idx], bidirectional)

    return mask_mod


def flex_block_mask(image_ids: Tensor, doc_ids: Tensor, bidirectional: bool = True, block_size: int = 128):
    """FlexAttention BlockMask (B, 1, L, L) from the rule; `device` always passed explicitly."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = image_ids.shape
    return create_block_mask(
        flex_mask_mod(image_ids, doc_ids, bidirectional), B, None, L, L,
        device=image_ids.device, BLOCK_SIZE=block_size,
    )
