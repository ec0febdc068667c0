"""Random layouts and a tiny byte tokenizer for the model-core tests (no data pipeline needed)."""

from __future__ import annotations

import torch

from transfusion.batch import MixedBatch, make_lm_targets
from transfusion.config import ModelConfig
from transfusion.model.build import build_model
from transfusion.model.transfusion import Transfusion


class ByteTokenizer:
    """Bytes 0..255 shifted by 5; ids 0-4 are PAD, BOS, EOS, BOI, EOI."""

    pad_id, bos_id, eos_id, boi_id, eoi_id = 0, 1, 2, 3, 4
    vocab_size = 261

    def encode(self, text: str) -> list[int]:
        return [b + 5 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 5 for i in ids if i >= 5).decode(errors="replace")


def micro_model(seed: int = 0, **overrides) -> Transfusion:
    cfg = ModelConfig.from_name("micro", **overrides)
    model = build_model(cfg, seed=seed).eval()
    torch.manual_seed(seed)
    # give the zero-initialised layers (patch output, U-Net residual branches) random weights so eps
    # predictions depend on the input
    with torch.no_grad():
        for name, p in model.patch.named_parameters():
            if name.endswith("weight") and p.dim() > 1 and not p.any():
                torch.nn.init.normal_(p, std=0.02)
    return model


def random_batch(cfg: ModelConfig, B: int = 3, L: int = 64, seed: int = 0, max_images: int = 3,
                 max_docs: int = 3) -> MixedBatch:
    """Rows of packed documents with several images at random places."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.patches_per_image
    tokens = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
    image_ids = torch.full((B, L), -1)
    doc_ids = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    n_img = 0
    for b in range(B):
        cuts = sorted(torch.randperm(L - 2, generator=g)[: int(torch.randint(0, max_docs, (1,), generator=g))] + 1)
        starts = [0] + [int(c) for c in cuts]
        for d, (s, e) in enumerate(zip(starts, starts[1:] + [L])):
            doc_ids[b, s:e] = d
            positions[b, s:e] = torch.arange(e - s)
            pos = s + 1
            for _ in range(int(torch.randint(min(1, max_images), max_images + 1, (1,), generator=g))):
                if pos + n + 1 > e:
                    break
                start = pos + int(torch.randint(0, max(1, e - pos - n), (1,), generator=g))
                if start + n > e:
                    break
                image_ids[b, start : start + n] = n_img
                n_img += 1
                pos = start + n + 1
    P = int((image_ids >= 0).sum())
    patches = torch.randn(P, cfg.patch_dim, generator=g)
    return MixedBatch(tokens=tokens, image_ids=image_ids, doc_ids=doc_ids, positions=positions,
                      lm_targets=make_lm_targets(tokens, image_ids, doc_ids), patches=patches,
                      image_max_t=torch.full((n_img,), 999))


def one_image_batch(cfg: ModelConfig, L: int = 48, start: int = 10, seed: int = 0) -> MixedBatch:
    """One row: text, one image at `start`, text."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.patches_per_image
    tokens = torch.randint(5, cfg.vocab_size, (1, L), generator=g)
    image_ids = torch.full((1, L), -1)
    image_ids[0, start : start + n] = 0
    docs = torch.zeros((1, L), dtype=torch.long)
    return MixedBatch(tokens=tokens, image_ids=image_ids, doc_ids=docs, positions=torch.arange(L)[None],
                      lm_targets=make_lm_targets(tokens, image_ids, docs),
                      patches=torch.randn(n, cfg.patch_dim, generator=g), image_max_t=torch.tensor([999]))
