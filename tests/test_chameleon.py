"""The Chameleon baseline and its stability options: QK-norm, post-norm, z-loss, image-token sequences and loss
masks, the model's cache, decoding, and a short training run through the trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core_helpers import ByteTokenizer, micro_model, random_batch
from train_helpers import write_micro_config
from transfusion import config as config_mod
from transfusion.batch import IGNORE
from transfusion.chameleon import decoding as cdec
from transfusion.chameleon.data import collate_tokens, encode_images
from transfusion.config import ConfigError, ModelConfig
from transfusion.data.sequences import Layout, Specials, image_document
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.losses import chameleon_loss, transfusion_loss
from transfusion.model.build import build_model
from transfusion.model.chameleon import Chameleon
from transfusion.model.transformer import Block, HeadNorm
from transfusion.tokenizer import Tokenizer

V, K = 2048, 8  # micro text vocabulary, fixture codebook


class TinyVQ:
    """The fixture quantiser: 2x2 patches -> (mean of channel 0 > 0) + 2 (channel 1) + 4 (channel 2): 8 codes."""

    codebook_size = K

    def encode_indices(self, images):
        m = F.avg_pool2d(images, 2) > 0  # (N, 3, h, w)
        return (m[:, 0] * 1 + m[:, 1] * 2 + m[:, 2] * 4).long()

    def decode_indices(self, codes):
        bits = torch.stack([(codes >> c) & 1 for c in range(3)], 1).float() * 2 - 1
        return bits.repeat_interleave(2, -2).repeat_interleave(2, -1)


def chameleon_cfg(**kw) -> ModelConfig:
    return ModelConfig.from_name("micro", family="chameleon", codebook_size=K, **kw)


# ---------------------------------------------------------------------------------------------- options


def test_options_off_keep_todays_parameters_and_outputs():
    base = micro_model()
    assert not any("q_norm" in k or "k_norm" in k for k in base.state_dict())
    b = random_batch(base.cfg, B=2, L=40)
    t = torch.full((b.patches.shape[0],), 300)
    explicit = micro_model(qk_norm=False, post_norm=False)
    with torch.no_grad():
        a = base(b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, t)
        c = explicit(b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, t)
    assert torch.equal(a.logits, c.logits) and torch.equal(a.diffusion, c.diffusion)


def test_head_norm_normalises_each_head_with_its_own_affine():
    norm = HeadNorm(n_heads=3, head_dim=8, eps=1e-5)
    x = torch.randn(2, 3, 5, 8) * 7 + 3  # (B, H, L, hd)
    y = norm(x)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 3, 5), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(2, 3, 5), atol=1e-3)
    with torch.no_grad():
        norm.weight[1] = 2.0
        norm.bias[2] = 0.5
    y2 = norm(x)
    assert torch.allclose(y2[:, 0], y[:, 0]) and torch.allclose(y2[:, 1], 2 * y[:, 1])
    assert torch.allclose(y2[:, 2], y[:, 2] + 0.5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    """The point of QK-norm: scaling the q/k projections cannot blow up the attention logits."""
    cfg = ModelConfig.from_name("micro", qk_norm=True)
    block = Block(cfg, 0)
    block.init_weights(0.02, 0.01)
    assert block.attn.q_norm is not None
    x = torch.randn(1, 10, cfg.dim)
    rope = build_model(cfg).rope(torch.arange(10)[None])
    mask = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    with torch.no_grad():
        before = block.attn(x, rope, mask)
        block.attn.wqkv.weight[: 2 * cfg.dim] *= 50.0  # q and k rows of the fused projection
        after = block.attn(x, rope, mask)
    assert torch.allclose(before, after, atol=1e-4)


def test_post_norm_normalises_each_branch_before_the_residual_add():
    cfg = ModelConfig.from_name("micro", post_norm=True)
    block = Block(cfg, 0)
    block.init_weights(0.02, 0.01)
    x = torch.randn(2, 6, cfg.dim)
    rope = build_model(cfg).rope(torch.arange(6).expand(2, 6))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        h = x + block.attn_norm(block.attn(x, rope, mask))
        expected = h + block.ffn_norm(block.ffn(h))
        assert torch.allclose(block(x, rope, mask), expected)
        pre = Block(ModelConfig.from_name("micro"), 0)
        pre.load_state_dict(block.state_dict())  # same parameters: only their place differs
        assert not torch.allclose(pre(x, rope, mask), expected)


def test_z_loss_adds_weight_times_mean_log_z_squared_and_is_absent_when_off():
    model = micro_model().train()
    b = random_batch(model.cfg, B=2, L=40, seed=1)
    sched = NoiseSchedule(1000)
    draw = (torch.full((b.num_images,), 400), torch.randn(b.patches.shape))
    off = transfusion_loss(model, b, sched, noise_draw=draw)
    on = transfusion_loss(model, b, sched, noise_draw=draw, z_loss_weight=1e-2)
    assert off.z_loss is None
    with torch.no_grad():
        mask = b.lm_targets != IGNORE
        logits = model(b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, draw[0][:1].expand(
            b.patches.shape[0]), logits_mask=mask).logits
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert torch.allclose(on.z_loss, z, rtol=1e-5)
    assert torch.allclose(on.loss, off.loss + 1e-2 * z, rtol=1e-5)
    on.loss.backward()  # the term has a gradient


# ---------------------------------------------------------------------------------------------- sequences


def _sp() -> Specials:
    tk = ByteTokenizer()
    return Specials(tk.pad_id, tk.bos_id, tk.eos_id, tk.boi_id, tk.eoi_id)


def test_image_tokens_and_loss_masks_caption_first_and_image_first():
    sp, n = _sp(), 4
    caption = np.array([10, 11, 12])
    codes = torch.tensor([[5, 6, 7, 0], [1, 2, 3, 4]])  # set image 0, 1
    docs = [image_document(caption, 1, n, Layout.CAPTION_FIRST, sp, 1000, 500),
            image_document(caption, 0, n, Layout.IMAGE_FIRST, sp, 1000, 500)]
    b = collate_tokens([docs], 32, sp.pad, codes, V, 12)
    toks, tg = b.tokens[0].tolist(), b.lm_targets[0].tolist()
    img1 = [V + c for c in (1, 2, 3, 4)]
    img0 = [V + c for c in (5, 6, 7, 0)]
    first = [sp.bos, 10, 11, 12, sp.boi, *img1, sp.eoi, sp.eos]
    second = [sp.bos, sp.boi, *img0, sp.eoi, 10, 11, 12, sp.eos]
    assert toks[:22] == first + second and set(toks[22:]) == {sp.pad}
    assert (b.image_ids == -1).all() and b.patches.shape[0] == 0 and b.num_images == 0
    # next token everywhere inside a document, the BOI -> first code and last code -> EOI included
    assert tg[:10] == first[1:]
    assert tg[4] == V + 1 and tg[8] == sp.eoi
    assert tg[10] == IGNORE  # EOS of doc 0 predicts nothing across the document boundary
    assert tg[11:21] == second[1:] and tg[12] == V + 5
    assert all(t == IGNORE for t in tg[21:])  # last EOS, padding
    b.validate(12, n, V + K)


def test_encode_images_checks_the_code_grid_against_the_config():
    imgs = torch.rand(2, 3, 8, 8) * 2 - 1
    codes = encode_images(TinyVQ(), imgs, 16)
    assert codes.shape == (2, 16) and int(codes.max()) < K
    with pytest.raises(ConfigError, match="codes per image"):
        encode_images(TinyVQ(), imgs, 4)


# ---------------------------------------------------------------------------------------------- model


def test_chameleon_config_and_build():
    with pytest.raises(ConfigError, match="codebook_size"):
        ModelConfig.from_name("micro", family="chameleon")
    model = build_model(chameleon_cfg())
    assert isinstance(model, Chameleon) and model.lm_head.out_features == V + K
    assert not hasattr(model, "patch")


def test_chameleon_loss_and_kv_cache_match_an_uncached_pass():
    torch.manual_seed(0)
    model = build_model(chameleon_cfg(qk_norm=True, post_norm=True)).eval()
    tokens = torch.randint(5, V + K, (2, 20))
    doc_ids = torch.zeros(2, 20, dtype=torch.long)
    doc_ids[1, 12:] = 1
    positions = torch.cat([torch.arange(20)[None], torch.cat([torch.arange(12), torch.arange(8)])[None]])
    with torch.no_grad():
        full = model(tokens, doc_ids, positions)  # (2, 20, V + K)
        cache = model.new_cache(2, 24)
        parts = [model(tokens[:, a:b], doc_ids[:, a:b], positions[:, a:b], cache=cache)
                 for a, b in [(0, 7), (7, 8), (8, 20)]]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    sp = _sp()
    docs = [image_document(np.array([10, 11]), 0, 16, Layout.CAPTION_FIRST, sp, 1000, 500)]
    batch = collate_tokens([docs, docs], 32, sp.pad, torch.randint(0, K, (1, 16)), V, 12)
    model.train()
    out = chameleon_loss(model, batch, z_loss_weight=1e-5)
    assert float(out.diffusion_loss) == 0.0 and out.z_loss is not None
    assert abs(float(out.lm_loss) - np.log(V + K)) < 0.5  # near uniform at init
    out.loss.backward()
    assert model.tok_emb.weight.grad[V:].abs().sum() > 0  # the code embeddings learn


def test_generation_samples_codes_with_cfg_and_captions_text():
    torch.manual_seed(0)
    model = build_model(chameleon_cfg()).eval()
    tk, vq = Tokenizer.load(), TinyVQ()
    g = torch.Generator().manual_seed(1)
    imgs = cdec.generate_images(model, tk, vq, ["a red bag", "x"], cfg_scale=3.0, temperature=1.0, top_k=4,
                                generator=g)
    assert imgs.shape == (2, 3, 8, 8) and imgs.abs().max() <= 1
    again = cdec.generate_images(model, tk, vq, ["a red bag", "x"], cfg_scale=3.0, temperature=1.0, top_k=4,
                                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(imgs, again)
    # CFG on logits: greedy guided codes are the argmax of uncond + s (cond - uncond) at the first step
    calls = []
    real = cdec.sample_logits
    cdec.sample_logits = lambda logits, *a: calls.append(logits.clone()) or real(logits, *a)
    try:
        cdec.generate_images(model, tk, vq, ["ab"], cfg_scale=2.0, temperature=0.0)
    finally:
        cdec.sample_logits = real
    with torch.no_grad():
        def first_logits(ids):
            return model(torch.tensor([ids]), torch.zeros(1, len(ids), dtype=torch.long),
                         torch.arange(len(ids))[None])[0, -1, V:]
        cond = first_logits([tk.bos_id, *tk.encode("ab"), tk.boi_id])
        uncond = first_logits([tk.bos_id, tk.boi_id])
    assert len(calls) == 16 and torch.allclose(calls[0][0], uncond + 2.0 * (cond - uncond), atol=1e-4)
    caps = cdec.caption_images(model, tk, vq, imgs, max_new_tokens=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


# ---------------------------------------------------------------------------------------------- trainer


def test_chameleon_trains_through_the_trainer_with_flops_and_z_loss(tmp_path):
    from transfusion.train import train

    extra = "z_loss = 1e-5"
    cfg_path = write_micro_config(tmp_path / "c.toml", steps=3, ckpt_every=3, extra=extra)
    cfg = config_mod.load(cfg_path, ["model.family=chameleon", "model.codebook_size=64", "data.vq=fixed:4",
                                     "model.qk_norm=true", "model.post_norm=true"])
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 3
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    flops = [r["flops"] for r in rows]
    assert all(f > 0 for f in flops) and flops == sorted(flops)
    assert all(r["z_loss"] > 0 for r in rows) and all(r["diffusion_loss"] == 0 for r in rows)
    # the evaluation suite draws and captions through the baseline's own decoding (ranking is skipped, said why)
    from test_eval_dataset import tiny_eval


    report = tiny_eval(tmp_path / "run", tmp_path)
    assert report["clip_score"] is not None and report["n_captions"] == 2
    assert "Chameleon" in report["skipped_metrics"]["ranked_accuracy"]
