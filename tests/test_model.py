import pytest
import torch

from core_helpers import micro_model, one_image_batch, random_batch
from transfusion.batch import BatchError, MixedBatch
from transfusion.config import ConfigError, ModelConfig
from transfusion.images import patchify, unpatchify
from transfusion.model.transfusion import Transfusion


def _args(b, t=None):
    t = torch.full((b.patches.shape[0],), 500) if t is None else t
    return (b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, t)


@pytest.mark.parametrize("name,target", [("0.16B", 0.16e9), ("0.37B", 0.37e9), ("0.76B", 0.76e9),
                                         ("1.4B", 1.4e9), ("7B", 7e9)])
def test_paper_sizes_within_10_percent(name, target):
    with torch.device("meta"):
        model = Transfusion(ModelConfig.from_name(name))
    assert abs(model.num_params() - target) / target < 0.10


def test_meta_build_then_init_weights_initialises_everything():
    cfg = ModelConfig.from_name("micro")
    with torch.device("meta"):
        model = Transfusion(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(t).all(), name
    assert torch.allclose(model.rope.cos[0], torch.ones_like(model.rope.cos[0]))


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="unknown model config 'huge'.*0.16B"):
        ModelConfig.from_name("huge")


def test_patchify_roundtrip_and_order():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (2, 4, 12)
    assert torch.equal(p[0, 1, :4], img[0, 0, 0:2, 2:4].flatten())  # 2nd patch = top-right window, channel 0
    assert torch.equal(unpatchify(p, 2, 3, 4, 4), img)


def _safe_splits(image_ids, k):
    """Split points that cut no image (decoding never splits an image across cache calls)."""
    L = image_ids.shape[1]
    ok = [s for s in range(1, L) if bool(((image_ids[:, s - 1] < 0) | (image_ids[:, s - 1] != image_ids[:, s])).all())]
    step = max(1, len(ok) // (k + 1))
    return ok[step::step][:k]


@pytest.mark.parametrize("seed,options", [(0, {}), (1, {}), (2, {}), (3, {"patch_pos_emb": True}),
                                          (4, {"patch_encoder": "unet", "unet_width": 8})])
def test_kv_cached_decoding_equals_uncached(seed, options):
    """Prefix through the cache in chunks (down to single tokens) == one uncached pass: logits and eps."""
    model = micro_model(**options)
    b = random_batch(model.cfg, B=2, L=60, seed=seed, max_docs=2)
    t = torch.randint(0, 1000, (b.patches.shape[0],))
    is_img = b.image_ids >= 0
    eps_full = torch.zeros(*is_img.shape, model.cfg.patch_dim)
    eps_cached = torch.zeros_like(eps_full)
    patch_at = torch.full(is_img.shape, -1)
    patch_at[is_img] = torch.arange(int(is_img.sum()))  # index into b.patches of each image position
    bounds = [0] + _safe_splits(b.image_ids, 4) + [60]
    assert len(bounds) >= 4
    with torch.no_grad():
        full = model(*_args(b, t))
        eps_full[is_img] = full.diffusion
        cache = model.new_cache(2, 64)
        logits = []
        for lo, hi in zip(bounds, bounds[1:]):
            sl = slice(lo, hi)
            idx = patch_at[:, sl][is_img[:, sl]]
            o = model(b.tokens[:, sl], b.image_ids[:, sl], b.doc_ids[:, sl], b.positions[:, sl],
                      b.patches[idx], t[idx], cache=cache)
            logits.append(o.logits)
            m = torch.zeros_like(is_img)
            m[:, sl] = is_img[:, sl]
            eps_cached[m] = o.diffusion
    assert cache.length == 60
    assert (torch.cat(logits, 1) - full.logits).abs().max() < 1e-5
    assert (eps_cached - eps_full).abs().max() < 1e-5


def test_uncommitted_steps_do_not_change_the_cache():
    """Diffusion steps (commit=False) overwrite the same slots; the prefix stays valid."""
    model = micro_model()
    cfg = model.cfg
    n = cfg.patches_per_image
    prefix = torch.randint(5, 100, (1, 7))
    L = 7 + n
    tokens = torch.cat([prefix, torch.zeros(1, n, dtype=torch.long)], 1)
    image_ids = torch.tensor([[-1] * 7 + [0] * n])
    docs = torch.zeros(1, L, dtype=torch.long)
    pos = torch.arange(L)[None]
    with torch.no_grad():
        cache = model.new_cache(1, L)
        model(tokens[:, :7], image_ids[:, :7], docs[:, :7], pos[:, :7], torch.zeros(0, cfg.patch_dim),
              torch.zeros(0, dtype=torch.long), cache=cache)
        for step in range(3):
            x = torch.randn(n, cfg.patch_dim)
            t = torch.full((n,), 900 - 300 * step)
            cached = model(tokens[:, 7:], image_ids[:, 7:], docs[:, 7:], pos[:, 7:], x, t, cache=cache,
                           commit=False)
            full = model(tokens, image_ids, docs, pos, x, t)
            assert cache.length == 7
            assert (cached.diffusion - full.diffusion).abs().max() < 1e-5


def test_future_text_never_changes_past_but_later_patch_changes_earlier_patch():
    model = micro_model()
    b = one_image_batch(model.cfg)
    is_img = b.image_ids[0] >= 0
    first, last = int(is_img.nonzero()[0]), int(is_img.nonzero()[-1])
    with torch.no_grad():
        base = model(*_args(b))
        # change the final text token: nothing before it may change
        b2 = MixedBatch(**{**b.__dict__, "tokens": b.tokens.clone()})
        b2.tokens[0, -1] = (b2.tokens[0, -1] + 1) % model.cfg.vocab_size
        out2 = model(*_args(b2))
        assert torch.equal(out2.logits[0, :-1], base.logits[0, :-1])
        assert torch.equal(out2.diffusion, base.diffusion)
        # change the image's last patch: its first patch's prediction changes (bidirectional within the image)
        b3 = MixedBatch(**{**b.__dict__, "patches": b.patches.clone()})
        b3.patches[-1] += 1.0
        out3 = model(*_args(b3))
        assert not torch.allclose(out3.diffusion[0], base.diffusion[0])
        assert torch.equal(out3.logits[0, :first], base.logits[0, :first])  # text before the image unchanged


def test_causal_ablation_makes_earlier_patches_blind_to_later_ones():
    model = micro_model(attention_mask="causal")
    b = one_image_batch(model.cfg)
    with torch.no_grad():
        base = model(*_args(b))
        b3 = MixedBatch(**{**b.__dict__, "patches": b.patches.clone()})
        b3.patches[-1] += 1.0
        assert torch.equal(model(*_args(b3)).diffusion[0], base.diffusion[0])


def test_documents_do_not_attend_across():
    model = micro_model()
    b = random_batch(model.cfg, B=1, L=40, seed=0, max_images=0, max_docs=1)
    b.doc_ids[0, 20:] = 1
    b.positions[0, 20:] = torch.arange(20)
    with torch.no_grad():
        base = model(*_args(b)).logits
        tokens = b.tokens.clone(); tokens[0, :20] = torch.randint(5, 100, (20,))
        other = model(tokens, *_args(b)[1:]).logits
    assert torch.allclose(base[0, 20:], other[0, 20:], atol=1e-6)


def test_bad_batches_raise_clear_errors():
    cfg = ModelConfig.from_name("micro")
    b = random_batch(cfg, B=2, L=64, seed=1)
    assert b.num_images > 0
    b.validate(cfg.patch_dim, cfg.patches_per_image, cfg.vocab_size)
    short = MixedBatch(**{**b.__dict__, "patches": b.patches[:-3]})
    with pytest.raises(BatchError, match="do not fit"):
        short.validate(cfg.patch_dim, cfg.patches_per_image)
    wrong = MixedBatch(**{**b.__dict__, "patches": torch.zeros(b.patches.shape[0], 5)})
    with pytest.raises(BatchError, match=r"expected \(P, 12\)"):
        wrong.validate(cfg.patch_dim, cfg.patches_per_image)
    with pytest.raises(BatchError, match="vocabulary"):
        b.validate(cfg.patch_dim, cfg.patches_per_image, vocab_size=50)
    split = MixedBatch(**{**b.__dict__, "image_ids": b.image_ids.clone()})
    pos = (split.image_ids[0] >= 0).nonzero()
    split.image_ids[0, int(pos[0])] = -1
    with pytest.raises(BatchError):
        split.validate(cfg.patch_dim, cfg.patches_per_image)


def test_position_beyond_max_seq_len_is_an_error():
    model = micro_model()
    b = random_batch(model.cfg, B=1, L=16, seed=0, max_images=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(b.tokens, b.image_ids, b.doc_ids, b.positions + 10_000, b.patches, torch.zeros(0, dtype=torch.long))


def test_patch_position_embedding_is_2d_and_position_aware():
    model = micro_model(patch_pos_emb=True)
    pos = model.patch.pos  # (n, dim), initialised from 2-D sin-cos
    assert pos.shape == (model.cfg.patches_per_image, model.cfg.dim)
    assert abs(float(pos.std()) - model.cfg.init_std) < 1e-3
    assert torch.cdist(pos, pos).add(torch.eye(len(pos))).min() > 0  # every patch slot distinct
    b = one_image_batch(model.cfg)
    with torch.no_grad():
        with_pos = model(*_args(b)).diffusion
        model.patch.pos.zero_()
        without = model(*_args(b)).diffusion
    assert not torch.allclose(with_pos, without)


def test_model_output_is_a_pytree_of_tensors():
    """FSDP2 hooks the root's pre-backward re-gather on the output tensors it finds by flattening the output; a
    plain dataclass hid them and backward failed on CUDA ("data is not allocated yet")."""
    from torch.utils._pytree import tree_flatten

    model = micro_model()
    b = random_batch(model.cfg, B=1, L=32, seed=0)
    leaves, _ = tree_flatten(model(*_args(b)))
    assert len(leaves) == 2 and all(isinstance(x, torch.Tensor) for x in leaves)


def test_rope_rotates_pairs_and_scores_depend_on_relative_position():
    """apply_rope against the textbook pair rotation, and q·k invariant to shifting both positions."""
    from transfusion.model.transformer import RotaryEmbedding, apply_rope

    hd = 8
    rope = RotaryEmbedding(hd, 64, 10000.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, hd, generator=g, dtype=torch.float64)
    pos = torch.tensor([[0, 3, 7, 20, 63]])
    out = apply_rope(x, *(c.double() for c in rope(pos)))
    theta = pos[0, :, None].double() * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (5, 4)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    ref = torch.cat([x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()], dim=-1)
    assert (out - ref).abs().max() < 1e-6  # the tables are stored in fp32
    q, k = torch.randn(2, 1, 1, 1, hd, generator=g).unbind(0)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert abs(score(10, 4) - score(40, 34)) < 1e-4 and abs(score(10, 4) - score(10, 5)) > 1e-3


def test_linear_patch_timestep_mlp_once_per_image_equals_per_patch():
    """LinearPatch runs its timestep MLP once per image when each image's patches share t (the training and
    sampling case) and per patch otherwise; both equal the per-patch formula."""
    from transfusion.model.patch import LinearPatch, image_timesteps, timestep_embedding

    torch.manual_seed(0)
    enc = LinearPatch(patch_dim=4, dim=32, image_patches=6)
    enc.init_weights(0.2)
    x = torch.randn(18, 4)

    def per_patch(t):
        return enc.proj_in(x + enc.t_mlp(timestep_embedding(t, enc.t_freq_dim)))

    shared = torch.tensor([5, 700, 999]).repeat_interleave(6)
    mixed = shared.clone()
    mixed[7] = 3
    assert torch.equal(image_timesteps(shared, 6), torch.tensor([5, 700, 999]))
    assert image_timesteps(mixed, 6) is None and image_timesteps(shared[:5], 6) is None
    with torch.no_grad():
        for t in (shared, mixed):
            h, _ = enc.encode(x, t)
            assert (h - per_patch(t)).abs().max() < 1e-5
        assert enc.encode(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))[0].shape == (0, 32)


def test_rope_out_and_cached_paths_agree_with_and_without_autograd():
    """apply_rope(out=...) (the decoder's copy-free path) equals the plain rotation, into a strided cache slot
    too; a cached forward with autograd recording (the plain path) equals the no-grad one."""
    from transfusion.model.transformer import RotaryEmbedding, apply_rope

    rope = RotaryEmbedding(16, 64, 10_000.0)
    cos, sin = rope(torch.arange(5, 12)[None].expand(2, 7))
    x = torch.randn(2, 7, 3, 4, 16).permute(2, 0, 3, 1, 4)[1]  # (B, H, L, hd), a strided view like k in qkv
    slot = torch.zeros(2, 4, 20, 16)[:, :, 3:10]  # a KV-cache-like strided destination
    assert torch.equal(apply_rope(x, cos, sin, out=slot), apply_rope(x, cos, sin))
    model = micro_model()
    b = random_batch(model.cfg, B=2, L=30, seed=3, max_images=0)
    t = torch.zeros(0, dtype=torch.long)

    def cached():
        cache = model.new_cache(2, 30)
        model(b.tokens[:, :20], b.image_ids[:, :20], b.doc_ids[:, :20], b.positions[:, :20], b.patches, t,
              cache=cache)
        return model(b.tokens[:, 20:], b.image_ids[:, 20:], b.doc_ids[:, 20:], b.positions[:, 20:], b.patches, t,
                     cache=cache).logits

    with torch.no_grad():
        fast = cached()
    slow = cached()
    assert slow.requires_grad and (slow - fast).abs().max() < 1e-5


def test_raw_stream_patch_decoder_keeps_the_input_scale():
    """model.patch_out_norm = false: the linear decoder reads the residual stream before the final norm, so a
    decoder that inverts the encoder copies x_t at any scale (through the normalised path the scale is divided
    out); the cached and uncached forwards still agree, and the option is refused for the U-Net."""
    model = micro_model(patch_out_norm=False)
    assert model.patch.norm_out is None
    b = one_image_batch(model.cfg)
    t = torch.full((b.patches.shape[0],), 999)
    with torch.no_grad():
        for blk in model.layers:  # blocks write nothing: the stream at the patches is proj_in(x_t + temb)
            blk.attn.wo.weight.zero_()
            blk.ffn.w2.weight.zero_()
        model.patch.t_mlp[2].weight.zero_()
        model.patch.t_mlp[2].bias.zero_()
        model.patch.proj_in.bias.zero_()
        model.patch.proj_out.weight.copy_(torch.linalg.pinv(model.patch.proj_in.weight))
        model.patch.proj_out.bias.zero_()
        small = model(*_args(b, t)).diffusion
        big = model(b.tokens, b.image_ids, b.doc_ids, b.positions, 3 * b.patches, t).diffusion
    assert torch.allclose(small, b.patches, atol=1e-4) and torch.allclose(big, 3 * b.patches, atol=1e-4)
    with pytest.raises(ConfigError, match="patch_out_norm"):
        ModelConfig.from_name("micro", patch_encoder="unet", patch_out_norm=False)


def test_patch_init_std_scales_the_encoder_input_side_only():
    """model.patch_init_std: the timestep MLP and the patch projection are drawn at that std; the transformer
    and the zero-initialised output keep theirs; 0 keeps model.init_std."""
    from transfusion.model.build import build_model

    base = build_model(ModelConfig.from_name("micro"), seed=0)
    wide = build_model(ModelConfig.from_name("micro", patch_init_std=0.2), seed=0)
    for lin in (wide.patch.t_mlp[0], wide.patch.t_mlp[2], wide.patch.proj_in):
        assert abs(float(lin.weight.std()) - 0.2) < 0.03
    assert abs(float(base.patch.proj_in.weight.std()) - 0.02) < 0.005
    assert torch.equal(wide.layers[0].attn.wqkv.weight, base.layers[0].attn.wqkv.weight)
    assert not wide.patch.proj_out.weight.any()
