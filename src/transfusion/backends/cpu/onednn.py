"""CPU fp32 fast path: every nn.Linear runs through oneDNN instead of MKL's sgemm.

PyTorch's fp32 `F.linear` on CPU calls MKL's sgemm. On this project's 2-core AVX-512 machines oneDNN's matmul
is faster at the shapes a Transfusion model uses (measured in benchmarks/results, interleaved):
- inference, weight reordered once into oneDNN's blocked layout ("packed"): 1.3× at 392 rows (a CFG diffusion
  step), 1.6–2.7× at 1–80 rows (LM decoding). A sampler calls the same weights hundreds of times, so the
  one-off reorder (~30 ms for the 14M-parameter benchmark model) pays for itself within a step;
- training, plain layout (the weights change every step): forward and input-gradient matmuls ~15% faster at
  2,400 rows; the weight gradient stays on MKL, which is faster there.
With packed weights each transformer Block also runs an inference forward with oneDNN post-ops (SwiGLU
activation/product and the residual additions fused into the matmuls).

Under CPU bf16 autocast (inference only) the packed path computes what autocast's linear does (bf16 inputs,
bf16 output) on bf16 weights packed lazily on first use, and each Block's SwiGLU keeps its fused post-ops; the
residual stream stays fp32 as under autocast. A 30-step CFG sample of the benchmark model: 1.08–1.13× faster
(in-process A/B, two runs).

`install(model, pack=...)` is a model converter (backends/__init__.py applies it where a model is built for
training or loaded for inference, as `[runtime] onednn` says): each Linear's forward then goes through oneDNN,
with no parameter change and nothing in the state dict; `onednn_linears` does the same for one block only. Each call falls back to
`F.linear` (a Block to its own forward) whenever the fast path would not be the same computation: autocast on
(other than the bf16 inference case above), a non-fp32 input, an empty input, a non-CPU tensor; a packed fp32
weight is used only while the weight is unchanged since packing (its version counter; bf16 copies are re-packed
on a change) and no gradient is needed. Equivalence (outputs and gradients) is tested in
tests/test_onednn.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transfusion.model.transformer import Block

def available() -> bool:
    """oneDNN's linear exists in this torch build (the x86/ARM CPU wheels have it)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _matmul(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ w (N, K)^T + bias -> (M, N) in oneDNN; `w` plain (any strides) or packed."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """y = x W^T + b with the forward and the input gradient in oneDNN, the weight gradient in MKL."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # x (M, K), weight (N, K)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad (M, N)
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = _matmul(grad, weight.t()) if ctx.needs_input_grad[0] else None  # (M, K)
        dw = grad.t() @ x if ctx.needs_input_grad[1] else None  # (N, K)
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _eligible(weight: Tensor) -> bool:
    # a plain fp32 CPU tensor: not a DTensor (FSDP), not meta, not a bf16 model
    return type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype == torch.float32


def _bf16_packer(weight: Callable[[], Tensor], rows_hint: int) -> Callable[[], Tensor]:
    """Lazily packed bf16 copy of `weight()` (fp32), re-packed whenever the weight's version changes."""
    state: dict[str, object] = {}

    def get() -> Tensor:
        w = weight()
        if state.get("version") != w._version:
            state["packed"] = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16), rows_hint)
            state["version"] = w._version
        return state["packed"]  # type: ignore[return-value]

    return get


def _forward(linear: nn.Linear, packed: Tensor | None, bf16: Callable[[], Tensor] | None = None
             ) -> Callable[[Tensor], Tensor]:
    version = linear.weight._version

    def forward(x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        w, b = linear.weight, linear.bias
        if bf16 is not None and _bf16_ok(x) and _eligible(w):  # what autocast's linear computes: bf16 in and out
            y = _matmul(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), bf16(),
                        None if b is None else b.detach().to(torch.bfloat16))
            return y.view(*x.shape[:-1], linear.out_features)
        if not (_onednn_ok(x) and _eligible(w)):
            return F.linear(x, w, b)
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            y = _Linear.apply(x2, w, b)
        elif packed is not None and w._version == version:
            y = _matmul(x2, packed, b)
        else:
            y = _matmul(x2, w.detach(), None if b is None else b.detach())
        return y.view(*x.shape[:-1], linear.out_features)

    return forward


def _onednn_ok(x: Tensor) -> bool:
    """oneDNN computes exactly what F.linear would for this input: fp32 on CPU, not empty, no autocast."""
    return (not torch.is_autocast_enabled("cpu") and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() > 0)


def _fast_ok(x: Tensor) -> bool:
    """The packed inference path applies: oneDNN does, and no gradient is being recorded."""
    return _onednn_ok(x) and not torch.is_grad_enabled()


def _bf16_ok(x: Tensor) -> bool:
    """The packed bf16 inference path applies: CPU bf16 autocast on, no gradient, a non-empty CPU fp32/bf16 input."""
    return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and x.numel() > 0)


def _block_forward(block: Block, rows_hint: int) -> Callable[..., Tensor]:
    """Inference forward of a transformer Block with oneDNN post-ops fused into the matmuls:

        h = x + heads(norm(x)) Wo^T                    ("add" post-op: no separate residual pass)
        n = norm(h)
        y = h + ((n W3^T) * silu(n W1^T)) W2^T         ("swish", "mul", "add" post-ops; W1, W3 = halves of w13)

    Same math as Block.forward (which it falls back to whenever the packed path does not apply); it saves the
    SwiGLU's split, activation and product passes and both residual additions (~3% of a diffusion step).

    Under CPU bf16 autocast (no gradient) the SwiGLU runs on lazily packed bf16 halves of w13 with the same
    swish / mul post-ops; the residual additions stay outside, in fp32, as autocast keeps the residual stream."""
    ffn, attn = block.ffn, block.attn
    hidden = ffn.w2.in_features
    w13 = ffn.w13.weight.detach()
    pack = torch.ops.mkldnn._reorder_linear_weight
    wo, w1 = pack(attn.wo.weight.detach(), rows_hint), pack(w13[:hidden].contiguous(), rows_hint)
    w3, w2 = pack(w13[hidden:].contiguous(), rows_hint), pack(ffn.w2.weight.detach(), rows_hint)
    weights = (attn.wo.weight, ffn.w13.weight, ffn.w2.weight)
    versions = [w._version for w in weights]
    plain = block.forward  # the class's forward, bound (the instance attribute is set after this)
    binary = torch.ops.mkldnn._linear_pointwise.binary
    w1_bf16 = _bf16_packer(lambda: ffn.w13.weight[:hidden], rows_hint)  # views share w13's version counter
    w3_bf16 = _bf16_packer(lambda: ffn.w13.weight[hidden:], rows_hint)

    def forward_bf16(x: Tensor, rope: tuple[Tensor, Tensor], mask, cache=None) -> Tensor:
        h = x + attn(block.attn_norm(x), rope, mask, cache)  # wqkv / wo: packed bf16 Linears; h fp32
        B, L, D = h.shape
        n = block.ffn_norm(h).reshape(B * L, D).to(torch.bfloat16)
        act = torch.ops.mkldnn._linear_pointwise(n, w1_bf16(), None, "swish", [], "")  # (B*L, hidden) bf16
        return h + ffn.w2(binary(n, act, w3_bf16(), None, "mul")).view(B, L, D)

    def forward(x: Tensor, rope: tuple[Tensor, Tensor], mask, cache=None) -> Tensor:
        if _bf16_ok(x) and _eligible(ffn.w13.weight):
            return forward_bf16(x, rope, mask, cache)
        if not _fast_ok(x) or [w._version for w in weights] != versions or not _eligible(ffn.w13.weight):
            return plain(x, rope, mask, cache)
        B, L, D = x.shape
        x2 = x.reshape(B * L, D)
        h = binary(attn.heads(block.attn_norm(x), rope, mask, cache).reshape(B * L, D), x2, wo, None, "add")
        n = block.ffn_norm(h)  # (B*L, D)
        act = torch.ops.mkldnn._linear_pointwise(n, w1, None, "swish", [], "")  # (B*L, hidden)
        return binary(binary(n, act, w3, None, "mul"), h, w2, None, "add").view(B, L, D)

    return forward


def install(model: nn.Module, pack: bool = True, rows_hint: int = 512) -> bool:
    """Route `model`'s Linears through oneDNN from now on (a model converter); returns whether it did.

    `pack=True` (inference) reorders each weight once, for about `rows_hint` rows per call (other sizes still
    work), and gives each transformer Block its fused inference forward; `pack=False` (training) uses the
    weights as they are. Nothing is installed unless every Linear is a plain fp32 CPU tensor (not FSDP's
    DTensors, not meta, not bf16) and oneDNN is available. A model that already has it is left as it is."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if any("forward" in m.__dict__ for m in linears):  # installed already
        return True
    if not (available() and linears and all(_eligible(m.weight) for m in linears)):
        return False
    # the fused forward is the pre-norm block's; a post-norm block (model.post_norm) keeps its own
    blocks = [b for b in model.modules() if isinstance(b, Block) and not b.post_norm] if pack else []
    in_fused = {id(m) for b in blocks for m in (b.attn.wo, b.ffn.w13, b.ffn.w2)}  # packed by _block_forward
    with torch.no_grad():
        for m in linears:
            packed = None
            if pack and id(m) not in in_fused:
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows_hint)
            bf16 = _bf16_packer(lambda m=m: m.weight, rows_hint) if pack else None  # packed on first bf16 use
            m.forward = _forward(m, packed, bf16)  # an instance attribute shadows nn.Linear.forward
        for b in blocks:
            b.forward = _block_forward(b, rows_hint)
    return True


def uninstall(model: nn.Module) -> None:
    """Undo `install`: every module runs its class's own forward again."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, Block)) and "forward" in m.__dict__:
            del m.forward


@contextmanager
def onednn_linears(model: nn.Module, pack: bool = True, rows_hint: int = 512, enabled: bool = True
                   ) -> Iterator[bool]:
    """`install` for the duration of the block only (A/B comparisons, tests); yields whether it is on.
    Re-entrant: inside an outer block (or on a model converted for good) it changes nothing."""
    if not enabled or any("forward" in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear)):
        yield enabled
        return
    on = install(model, pack, rows_hint)
    try:
        yield on
    finally:
        if on:
            uninstall(model)


def packed_linears(model: nn.Module, enabled: bool = True):
    """Inference: `onednn_linears` with packed weights."""
    return onednn_linears(model, pack=True, enabled=enabled)
