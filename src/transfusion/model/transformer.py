"""Llama-style transformer blocks: RMSNorm, RoPE, multi-head attention, SwiGLU (paper §4.1 follows Llama).

Pure nn.Modules: nothing here knows about training, data, diffusion, kernels or distribution. Attention takes
either a dense bool mask (its `dense_kernel`, scaled_dot_product_attention unless a backend swaps in an equal
one; CPU and GPU, with backward everywhere) or a FlexAttention BlockMask (GPU training); both come from the same
rule in masks.py.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transfusion.config import ModelConfig
from transfusion.model.kv_cache import KVCache

_compiled_flex = None


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """FlexAttention; compiled on GPU (eager flex is a slow reference), eager on CPU (forward only there)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention with a dense bool mask: q (B, H, L, hd), k/v (B, H, S, hd), mask (B, 1, L, S) -> (B, H, L, hd).

    The model's reference kernel. Backends may give an Attention module another `dense_kernel` with the same
    signature and result (backends/cpu/attention.py); the model itself never chooses kernels."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class HeadNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm over each head's hd values, with a separate affine per head.

    Normalising q and k bounds the attention logits q.k / sqrt(hd), which is what kept Chameleon's mixed-modal
    training from diverging (its §2.3: image and text tokens pull the norms apart)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, 1, head_dim))  # broadcasts over (B, H, L, hd)
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, H, L, hd) -> (B, H, L, hd)
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * self.weight + self.bias

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


class RotaryEmbedding(nn.Module):
    """RoPE tables for positions [0, max_len), rotating half-split pairs (x[i], x[i + hd/2]).

    Stored full width so the rotation is two fused passes (apply_rope): cos = [cos θ, cos θ] and the signed
    sin = [-sin θ, sin θ], with θ = position · theta^(-2i/hd).
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        self.register_buffer("cos", torch.empty(max_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, head_dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.cos.device.type == "meta":
            return
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        angles = torch.outer(torch.arange(self.max_len, dtype=torch.float64), inv)  # (max_len, hd/2)
        self.cos.copy_(torch.cat([angles.cos(), angles.cos()], dim=-1).float())
        self.sin.copy_(torch.cat([-angles.sin(), angles.sin()], dim=-1).float())

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) positions -> cos, signed sin of shape (B, 1, L, hd) for broadcasting over heads."""
        # checked on CPU only: on GPU the .max() would sync every step (an out-of-range index asserts there anyway)
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} >= model.max_seq_len {self.max_len}")
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None) -> Tensor:
    """x (B, H, L, hd); cos/sin (B, 1, L, hd) from RotaryEmbedding. Rotates each pair (x1, x2) = (x[i], x[i+hd/2]):
    (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + [x2, x1] * [-sin, sin]. `out` (no autograd): write the result
    there, e.g. straight into a KV-cache slot or a contiguous buffer, instead of a new tensor."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin, rot = cos.to(x.dtype), sin.to(x.dtype), torch.cat([x2, x1], dim=-1)
    if out is None:
        return torch.addcmul(x * cos, rot, sin)
    return torch.mul(x, cos, out=out).addcmul_(rot, sin)


DenseKernel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (q, k, v, bool mask) -> out


class Attention(nn.Module):
    dense_kernel: DenseKernel = staticmethod(sdpa_attention)  # a backend may set another per instance

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.n_heads, self.head_dim, self.layer_id = cfg.n_heads, cfg.head_dim, layer_id
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # fused q, k, v
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        # model.qk_norm (off: no module, so the state dict and the numbers are today's)
        self.q_norm = HeadNorm(cfg.n_heads, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = HeadNorm(cfg.n_heads, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask, cache: KVCache | None = None) -> Tensor:
        return self.wo(self.heads(x, rope, mask, cache))  # (B, L, D)

    def heads(self, x: Tensor, rope: tuple[Tensor, Tensor], mask, cache: KVCache | None = None) -> Tensor:
        """Everything but the output projection: (B, L, D) -> the heads' outputs side by side (B, L, D)."""
        B, L, D = x.shape
        qkv = self.wqkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, L, hd), views into qkv
        if self.q_norm is not None:  # before RoPE, as Chameleon: the rotation keeps the normalised length
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None and not qkv.requires_grad and cache.k.dtype == k.dtype:
            # decoding: RoPE writes q contiguous (no copy before the score matmul) and k straight into its
            # cache slots (no copy into the cache): ~1-2% of a 30-step sample
            q = apply_rope(q, *rope, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
            k_slot, v_slot = cache.slots(self.layer_id, L)
            apply_rope(k, *rope, out=k_slot)
            v_slot.copy_(v)
            k, v = cache.keys_values(self.layer_id, L)  # (B, H, S, hd) with the cached prefix
        else:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.update(self.layer_id, k, v)  # (B, H, S, hd) with the cached prefix
        if isinstance(mask, Tensor):
            out = self.dense_kernel(q, k, v, mask)
        else:
            out = _flex_attention(q, k, v, mask)
        return out.transpose(1, 2).reshape(B, L, D)


class FeedForward(nn.Module):
    """SwiGLU with fused gate/up projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        self.post_norm = cfg.post_norm

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask, cache: KVCache | None = None) -> Tensor:
        if self.post_norm:  # Chameleon's reordering: each branch's output is normalised before it is added, so
            # no branch can grow the residual stream without bound (same two norms, other place)
            x = x + self.attn_norm(self.attn(x, rope, mask, cache))
            return x + self.ffn_norm(self.ffn(x))
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)  # (B, L, D)
        return x + self.ffn(self.ffn_norm(x))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        if self.attn.q_norm is not None:
            self.attn.q_norm.reset_parameters()
            self.attn.k_norm.reset_parameters()
        nn.init.trunc_normal_(self.attn.wqkv.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.ffn.w13.weight, std=std, a=-3 * std, b=3 * std)
        # residual-branch outputs scaled by depth so the residual stream's variance stays O(1) at init
        nn.init.trunc_normal_(self.attn.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        nn.init.trunc_normal_(self.ffn.w2.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


def residual_out_std(std: float, n_layers: int) -> float:
    return std / math.sqrt(2 * n_layers)
