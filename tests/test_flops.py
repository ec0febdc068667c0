"""The FLOP count of a training step (model/flops.StepFlops) against torch.utils.flop_counter, both families.

The counter sees matmuls and convolutions; SDPA's CPU kernel is invisible to it, so the models here run the
attention as explicit matmuls (the same numbers) for the count. Tolerance 3%: the formula counts backward as
2x forward for every layer, including the first patch layer, whose input needs no gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from core_helpers import micro_model, random_batch
from transfusion.batch import IGNORE
from transfusion.chameleon.data import collate_tokens
from transfusion.config import ModelConfig
from transfusion.data.sequences import Layout, Specials, image_document, text_document
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.losses import chameleon_loss, transfusion_loss
from transfusion.model.build import build_model
from transfusion.model.flops import StepFlops, flops_per_token
from transfusion.model.transformer import Attention

TOLERANCE = 0.03


def math_attention(q, k, v, mask):
    """matmul -> softmax -> matmul: what SDPA computes, in ops the counter sees. (B, H, L, hd) -> same."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _counted(model, loss_fn) -> float:
    for m in model.modules():
        if isinstance(m, Attention):
            m.dense_kernel = math_attention
    with FlopCounterMode(display=False) as counter:
        loss_fn().loss.backward()
    return float(counter.get_total_flops())


@pytest.mark.parametrize("options", [{}, {"patch_encoder": "unet", "unet_width": 8}, {"qk_norm": True}])
def test_transfusion_step_flops_match_the_counter(options):
    model = micro_model(**options).train()
    b = random_batch(model.cfg, B=2, L=64, seed=3)
    draw = (torch.full((b.num_images,), 300), torch.randn(b.patches.shape))
    counted = _counted(model, lambda: transfusion_loss(model, b, NoiseSchedule(1000), noise_draw=draw))
    targets = int((b.lm_targets != IGNORE).sum())
    formula = StepFlops(model.cfg)(b.tokens.numel(), 64, targets, b.num_images)
    assert b.num_images > 0 and abs(formula - counted) / counted < TOLERANCE, (formula, counted)


def test_chameleon_step_flops_match_the_counter():
    cfg = ModelConfig.from_name("micro", family="chameleon", codebook_size=64, post_norm=True)
    model = build_model(cfg).train()
    sp = Specials(0, 1, 2, 3, 4)
    rng = np.random.default_rng(0)
    docs = [image_document(np.array([10, 11, 12]), 0, 16, Layout.CAPTION_FIRST, sp, 1000, 500),
            text_document(rng.integers(5, 2000, 20), sp)]
    batch = collate_tokens([docs, docs[::-1]], 64, 0, torch.randint(0, 64, (1, 16)), cfg.vocab_size,
                           cfg.patch_dim)
    counted = _counted(model, lambda: chameleon_loss(model, batch))
    targets = int((batch.lm_targets != IGNORE).sum())
    formula = StepFlops(cfg)(batch.tokens.numel(), 64, targets, 0)
    assert abs(formula - counted) / counted < TOLERANCE, (formula, counted)


def test_mfu_convention_unchanged_and_chameleon_head_counts_codes():
    mc = ModelConfig.from_name("tiny")
    n = sum(p.numel() for k, p in build_model(mc, "meta").named_parameters()
            if k not in ("tok_emb.weight", "lm_head.weight"))
    assert flops_per_token(mc, 128) == 6 * n + 12 * mc.n_layers * mc.dim * 128
    ch = ModelConfig.from_name("tiny", family="chameleon", codebook_size=4096)
    tf, cm = StepFlops(mc), StepFlops(ch)
    # the same rows: Chameleon pays the LM head on every image code, Transfusion the patch layers per image
    assert cm(4096, 128, 4000, 0) - tf(4096, 128, 4000, 0) == pytest.approx(6 * 4096 * 256 * 4000)
    assert tf.patch_fwd > 0 and cm.patch_fwd == 0
