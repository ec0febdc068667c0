import pytest
import torch
import torch.nn.functional as F

from core_helpers import micro_model, random_batch
from transfusion.config import AttentionImpl
from transfusion.model.masks import dense_mask, flex_block_mask, transfusion_mask


def naive_mask(image_ids, doc_ids, bidirectional=True):
    L = len(image_ids)
    m = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if doc_ids[q] != doc_ids[k]:
                continue
            same_img = bidirectional and image_ids[q] >= 0 and image_ids[q] == image_ids[k]
            m[q, k] = k <= q or same_img
    return m


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bidirectional", [True, False])
def test_mask_rule_matches_naive_loop(seed, bidirectional):
    model = micro_model()
    b = random_batch(model.cfg, B=3, L=48, seed=seed)
    dense = dense_mask(b.image_ids, b.doc_ids, bidirectional=bidirectional)
    for r in range(3):
        expect = naive_mask(b.image_ids[r].tolist(), b.doc_ids[r].tolist(), bidirectional)
        assert torch.equal(dense[r, 0], expect)
        assert torch.equal(transfusion_mask(b.image_ids[r], b.doc_ids[r], bidirectional), expect)


def test_public_mask_single_row_example():
    ids = torch.tensor([-1, -1, 0, 0, 0, -1, 1, 1, -1])
    m = transfusion_mask(ids)
    assert m[2, 4] and m[3, 4] and not m[1, 2]  # patches see later patches of their image, text does not
    assert not m[5, 6] and m[7, 6] and m[6, 7]  # image 1 bidirectional, text before it causal
    assert not m[4, 6]  # image 0 does not see image 1


def test_cached_suffix_mask_equals_rows_of_full_mask():
    model = micro_model()
    b = random_batch(model.cfg, B=2, L=40, seed=3)
    full = dense_mask(b.image_ids, b.doc_ids)
    assert torch.equal(dense_mask(b.image_ids, b.doc_ids, q_start=25), full[:, :, 25:])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_forward_equals_sdpa_dense(seed):
    torch.manual_seed(seed)
    model = micro_model()
    b = random_batch(model.cfg, B=2, L=96, seed=seed)
    B, H, L, D = 2, 4, 96, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    from torch.nn.attention.flex_attention import flex_attention

    bm = flex_block_mask(b.image_ids, b.doc_ids, block_size=32)
    out_flex = flex_attention(q, k, v, block_mask=bm)
    out_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(b.image_ids, b.doc_ids))
    assert (out_flex - out_sdpa).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_model_forward_equals_sdpa_model():
    sdpa = micro_model()
    flex = micro_model(attention_impl=AttentionImpl.FLEX)
    flex.load_state_dict(sdpa.state_dict())
    b = random_batch(sdpa.cfg, B=2, L=64, seed=1)
    t = torch.randint(0, 1000, (b.patches.shape[0],))
    args = (b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, t)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        o1, o2 = sdpa(*args), flex(*args)
    assert (o1.logits - o2.logits).abs().max() < 1e-5
    assert (o1.diffusion - o2.diffusion).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,grad", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
                                        (torch.float32, True)])
@pytest.mark.parametrize("q_start", [0, 30])
def test_dense_attention_fast_path_equals_sdpa(dtype, grad, q_start, monkeypatch):
    """The explicit CPU attention (bf16; fp32 without autograd) against SDPA on the Transfusion mask, full and
    KV-cached (queries a suffix of the keys): outputs and gradients; fp32 training must be SDPA itself."""
    from transfusion.backends.cpu import attention

    model = micro_model()
    b = random_batch(model.cfg, B=2, L=80, seed=5)
    mask = dense_mask(b.image_ids, b.doc_ids, q_start=q_start)  # (B, 1, 80 - q_start, 80)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (80 - q_start, 80, 80))
    gout = torch.randn(2, 4, 80 - q_start, 16, generator=g)

    def run(fn):
        xs = [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]
        with torch.set_grad_enabled(grad):
            out = fn(*xs, mask)
            grads = torch.autograd.grad(out, xs, gout.to(dtype)) if grad else ()
        return [t.float() for t in (out, *grads)]

    ref = run(lambda q_, k_, v_, m: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=m))
    fast = run(attention.MathAttention())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, r in zip(fast, ref):
        assert torch.isfinite(a).all() and (a - r).abs().max() <= tol * r.abs().max()
    monkeypatch.setattr(attention, "MAX_SCORES", 0)  # too large to hold: SDPA itself
    for a, r in zip(run(attention.MathAttention()), ref):
        assert torch.equal(a, r)


@pytest.mark.parametrize("L,S,math", [(80, 80, True), (1, 300, False), (196, 708, False)])
def test_fp32_attention_dispatch_by_size(L, S, math):
    """fp32 without autograd takes the explicit path only for short contexts (L > 1, L * S <= 2^16); one-token
    decoding and long contexts are SDPA itself, bit for bit. Either way the output matches SDPA."""
    from transfusion.backends.cpu import attention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, L, 16, generator=g)
    k, v = torch.randn(1, 2, S, 16, generator=g), torch.randn(1, 2, S, 16, generator=g)
    mask = torch.rand(1, 1, L, S, generator=g) > 0.3
    mask[..., 0] = True
    with torch.no_grad():
        assert attention.math_attention_wins(q, S) is math
        out = attention.MathAttention()(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(out, ref) or math


def test_attention_bias_built_once_per_mask():
    """The explicit path's additive bias is memoised per mask object (one per forward, shared by the layers):
    reused while the mask is unchanged, rebuilt after an in-place change or for another dtype / head count,
    dropped when the mask is freed, never kept for inference-mode masks."""
    import gc

    from transfusion.backends.cpu.attention import BiasMemo

    memo = BiasMemo()
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[..., 0] = True
    a = memo.bias(mask, torch.float32, 3)
    assert a.shape == (6, 5, 7) and memo.bias(mask, torch.float32, 3) is a
    expected = torch.zeros(2, 3, 5, 7).masked_fill_(~mask, float("-inf")).reshape(6, 5, 7)
    assert torch.equal(a, expected)
    assert memo.bias(mask, torch.bfloat16, 3).dtype == torch.bfloat16
    assert memo.bias(mask, torch.float32, 2).shape[0] == 4
    b = memo.bias(mask, torch.float32, 3)
    mask[0, 0, 1, 1] = not bool(mask[0, 0, 1, 1])  # in place: the cached bias is stale
    c = memo.bias(mask, torch.float32, 3)
    assert c is not b and torch.equal(c, torch.zeros(2, 3, 5, 7).masked_fill_(~mask, float("-inf")).reshape(6, 5, 7))
    del mask, a, b, c
    gc.collect()
    assert memo.entry is None  # freed with the mask
    with torch.inference_mode():
        m2 = torch.ones(1, 1, 2, 2, dtype=torch.bool)
        assert torch.equal(memo.bias(m2, torch.float32, 1), torch.zeros(1, 2, 2))
    assert memo.entry is None
