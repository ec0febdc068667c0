"""The oneDNN packed-Linear fast path (model/onednn.py) against plain F.linear, and the decoders built on it."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core_helpers import ByteTokenizer, micro_model, random_batch
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.decoding import caption_images, generate_images
from transfusion.backends.cpu import onednn
from transfusion.backends.cpu.onednn import onednn_linears, packed_linears

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
TK = ByteTokenizer()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    if b.numel() == 0:
        return a.shape == b.shape
    return bool((a - b).abs().max() <= rel * b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (2, 7, 48), (392, 48), (3, 0, 48)])
def test_packed_linear_equals_f_linear(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(shape)
    ref = F.linear(x, lin.weight, lin.bias)
    with torch.no_grad(), packed_linears(lin) as on:
        assert on and "forward" in lin.__dict__
        out = lin(x)
    assert out.shape == ref.shape == (*shape[:-1], 80)
    assert _close(out, ref)
    assert "forward" not in lin.__dict__  # restored on exit


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_equal_f_linear(pack, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(3, 70, 48, requires_grad=True)
    g = torch.randn(3, 70, 80)
    ref = torch.autograd.grad(F.linear(x, lin.weight, lin.bias), [x, *lin.parameters()], g)
    with onednn_linears(lin, pack=pack) as on:
        assert on
        out = torch.autograd.grad(lin(x), [x, *lin.parameters()], g)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and _close(a, b)
    with onednn_linears(lin, pack=pack):  # frozen weights, input needs grad
        lin.requires_grad_(False)
        (dx,) = torch.autograd.grad(lin(x), [x], g)
        lin.requires_grad_(True)
    assert _close(dx, ref[0])


def test_fallbacks_keep_autocast_and_fresh_weights():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with packed_linears(lin):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert lin(x).dtype == torch.bfloat16  # autocast still applies
        with torch.no_grad():
            lin.weight.mul_(2.0)  # changed after packing: the stale packed copy must not be used
            assert _close(lin(x), F.linear(x, lin.weight, lin.bias))


def test_disabled_nested_and_ineligible_models_leave_forward_alone():
    lin = nn.Linear(8, 8)
    with packed_linears(lin) as outer:
        with packed_linears(lin) as inner:
            assert outer and inner
        assert "forward" in lin.__dict__  # the inner block must not unpack the outer one's weights
    assert "forward" not in lin.__dict__
    with packed_linears(lin, enabled=False) as on:
        assert not on and "forward" not in lin.__dict__
    with packed_linears(nn.Linear(8, 8).to(torch.bfloat16)) as on:
        assert not on


def test_model_forward_uncached_and_cached_match_plain():
    model = micro_model()
    b = random_batch(model.cfg, B=2, L=48, seed=1, max_images=0)  # text only, so any split point is valid
    t = torch.zeros(0, dtype=torch.long)
    args = (b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, t)
    b2 = random_batch(model.cfg, B=2, L=48, seed=2)
    args2 = (b2.tokens, b2.image_ids, b2.doc_ids, b2.positions, b2.patches, torch.full((b2.patches.shape[0],), 500))
    with torch.no_grad():
        ref, ref2 = model(*args), model(*args2)
        with packed_linears(model):
            fast, fast2 = model(*args), model(*args2)
            cache = model.new_cache(2, 48)
            head = model(*(a[:, :30] for a in args[:4]), b.patches, t, cache=cache).logits
            tail = model(*(a[:, 30:] for a in args[:4]), b.patches, t, cache=cache).logits
    assert _close(fast.logits, ref.logits, 1e-4) and _close(fast2.diffusion, ref2.diffusion, 1e-4)
    assert _close(fast2.logits, ref2.logits, 1e-4)
    assert _close(torch.cat([head, tail], 1), ref.logits, 1e-4)


def test_generation_and_captioning_match_the_plain_path():
    """The inference converters as `transfusion.load` applies them (packed oneDNN + CPU math attention) against
    the plain model; `uninstall` restores the class forwards."""
    from transfusion.backends import convert_model
    from transfusion.config import RuntimeConfig

    model, sched = micro_model(vocab_size=TK.vocab_size), NoiseSchedule()
    kw = dict(steps=6, cfg_scale=3.0, sampler="ddim", progress=False, clip_x0=None)
    imgs = torch.rand(2, 3, 8, 8) * 2 - 1
    ref = generate_images(model, TK, ["a red dress"], sched, generator=torch.Generator().manual_seed(0), **kw)
    ref_caps = caption_images(model, TK, imgs, max_new_tokens=6)
    assert convert_model(model, RuntimeConfig(), inference=True) == ["cpu_math_attention", "onednn_packed"]
    fast = generate_images(model, TK, ["a red dress"], sched, generator=torch.Generator().manual_seed(0), **kw)
    assert _close(fast, ref, 1e-4)
    assert caption_images(model, TK, imgs, max_new_tokens=6) == ref_caps
    onednn.uninstall(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_training_step_gradients_match_plain():
    from transfusion.losses import transfusion_loss

    model = micro_model().train()
    b = random_batch(model.cfg, B=2, L=48, seed=3)
    sched = NoiseSchedule()

    def grads(fast: bool):
        model.zero_grad(set_to_none=True)
        with onednn_linears(model, pack=False, enabled=fast) as on:
            assert on == fast
            out = transfusion_loss(model, b, sched, generator=torch.Generator().manual_seed(0))
            out.loss.backward()
        return float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss_ref, ref), (loss_fast, fast) = grads(False), grads(True)
    assert abs(loss_fast - loss_ref) <= 1e-5 * abs(loss_ref)
    assert ref.keys() == fast.keys() and len(ref) > 10
    for n in ref:
        assert _close(fast[n], ref[n], 1e-4), n


def test_fused_block_path_runs_and_falls_back_on_changed_weights():
    from torch.profiler import profile

    model = micro_model()
    b = random_batch(model.cfg, B=2, L=40, seed=4)
    args = (b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, torch.full((b.patches.shape[0],), 300))
    def silu_calls(prof) -> int:
        return sum(e.count for e in prof.key_averages() if e.key == "aten::silu")

    with torch.no_grad():
        with profile() as plain:
            ref = model(*args)
        with packed_linears(model):
            assert all("forward" in blk.__dict__ for blk in model.layers)
            with profile() as prof:
                fast = model(*args)
            # the fused forward ran: no SwiGLU activation left as a separate op in any block
            assert silu_calls(plain) - silu_calls(prof) == model.cfg.n_layers
            assert _close(fast.diffusion, ref.diffusion, 1e-4) and _close(fast.logits, ref.logits, 1e-4)
            model.layers[0].ffn.w2.weight.mul_(1.5)  # stale packed copy: the block must use the new weight
            changed = model(*args)
        model.layers[0].ffn.w2.weight.div_(1.5)
        model.layers[0].ffn.w2.weight.mul_(1.5)
        ref_changed = model(*args)
    assert not _close(changed.diffusion, ref.diffusion, 1e-3)
    assert _close(changed.diffusion, ref_changed.diffusion, 1e-4) and _close(changed.logits, ref_changed.logits, 1e-4)


def test_bf16_autocast_linear_uses_packed_bf16_weights():
    """Under CPU bf16 autocast without autograd, a Linear runs on a lazily packed bf16 copy of its weight: the
    same computation as autocast's F.linear (bf16 in and out), re-packed after an in-place weight change; with
    autograd on it is autocast's own F.linear."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 80)
    x = torch.randn(7, 48)

    def ref():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.linear(x, lin.weight, lin.bias)

    expected = ref()
    with packed_linears(lin):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = lin(x)
        with torch.no_grad():
            lin.weight.mul_(-2.0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                changed = lin(x)  # a fresh autocast context: autocast caches its own weight casts per context
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x.requires_grad_())
    assert out.dtype == torch.bfloat16 and _close(out.float(), expected.float(), 1e-2)
    assert _close(changed.float(), ref().float(), 1e-2)  # the stale bf16 copy was not used
    assert y.grad_fn is not None and torch.equal(y, ref())


def test_bf16_autocast_model_and_fused_swiglu_match_autocast():
    """The bf16 fast path of a whole model (packed bf16 Linears, SwiGLU swish/mul as oneDNN post-ops, residuals
    in fp32 as under autocast) against plain autocast: within bf16 rounding, the fused path ran, and a weight
    changed in place inside the block is used."""
    from torch.profiler import profile

    model = micro_model()
    b = random_batch(model.cfg, B=2, L=40, seed=6)
    args = (b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, torch.full((b.patches.shape[0],), 400))

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*args)

    def silu_calls(prof) -> int:
        return sum(e.count for e in prof.key_averages() if e.key == "aten::silu")

    with profile() as plain:
        ref = run()
    with packed_linears(model):
        with profile() as prof:
            fast = run()
        with torch.no_grad():
            model.layers[-1].ffn.w13.weight.mul_(1.5)
        changed = run()
    model_changed_ref = run()
    assert silu_calls(plain) - silu_calls(prof) == model.cfg.n_layers  # every block's SwiGLU was fused
    for a, r in ((fast, ref), (changed, model_changed_ref)):
        assert a.diffusion.dtype == r.diffusion.dtype and a.logits.dtype == r.logits.dtype
        assert _close(a.diffusion.float(), r.diffusion.float(), 3e-2) and _close(a.logits.float(), r.logits.float(), 3e-2)
    assert not _close(changed.diffusion.float(), ref.diffusion.float(), 3e-2)
