"""Chameleon's data: the Transfusion documents with each image's patch span replaced by its VQ-VAE codes.

    caption first:   BOS caption BOI c_1 .. c_n EOI EOS      (c_i = model.vocab_size + code i, raster order)
    image first:     BOS BOI c_1 .. c_n EOI caption EOS      (data.image_first_prob, as Transfusion's 80/20)
    caption dropped: BOS BOI c_1 .. c_n EOI EOS              (data.caption_dropout: the unconditional mode CFG uses)

The loader plans rows exactly as Transfusion's does (same seed -> same documents, same packing, same layouts);
only `batch_at` differs: codes instead of rendered patches, `image_ids` all -1 (an image is a token sequence to
a causal model), no patches, no timesteps. The noise limit has no meaning here and is ignored.

Loss targets (batch.make_lm_targets with no image spans): every next token inside a document, text and code
alike, *including* BOI -> c_1. Transfusion has no loss on BOI's output (fn. 8) because the first patch is a
diffusion target, not a token; for Chameleon c_1 is a token the model must learn to emit, or it could never
start an image. c_n -> EOI is kept too (one token; what generation appends anyway). PAD is never a target.

Codes are computed once per (quantiser, dataset split) and cached on disk (TRANSFUSION_CACHE/vq_codes/), so
the VQ-VAE runs on every image once, not every step.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from transfusion.batch import MixedBatch, make_lm_targets
from transfusion.chameleon.vq import Quantizer, load_vq
from transfusion.config import Config, ConfigError
from transfusion.data.image_text import ImageTextSet
from transfusion.data.loader import Loader, load_sources
from transfusion.data.sequences import PATCH, Document
from transfusion.env import cache_dir
from transfusion.log import log
from transfusion.tokenizer import Tokenizer


@torch.no_grad()
def encode_images(vq: Quantizer, images: Tensor, n_codes: int) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, n_codes) long codes, raster order; checks the grid fits the config."""
    codes = vq.encode_indices(images)  # (N, h, w)
    if codes[0].numel() != n_codes:
        raise ConfigError(f"the quantiser gives {tuple(codes.shape[1:])} codes per image but the config expects "
                          f"{n_codes} ((model.image_size / model.patch_size)**2; patch_size = its downsampling)")
    return codes.reshape(codes.shape[0], -1).long()


def _fingerprint(vq: Quantizer, spec: str, images: ImageTextSet) -> str:
    h = hashlib.sha1()
    ident = getattr(vq, "fingerprint", None) or spec
    if callable(ident):  # the VQ-VAE's fingerprint() hashes its config and weights (autoencoder/model.py)
        ident = ident()
    if ident == spec and Path(spec).exists():  # a checkpoint: retrained in place -> new codes
        ident += f":{max(p.stat().st_mtime_ns for p in Path(spec).rglob('*') if p.is_file())}"
    h.update(ident.encode())
    h.update(f"{images.name}:{images.image_size}:{tuple(images.pixels.shape)}".encode())
    h.update(images.pixels.numpy().tobytes())
    return h.hexdigest()[:20]


def image_codes(vq: Quantizer, spec: str, images: ImageTextSet, n_codes: int, chunk: int = 256,
                cache: Path | None = None) -> Tensor:
    """(len(images), n_codes) long codes of every image, from the disk cache when it has them."""
    path = (cache or cache_dir() / "vq_codes") / f"{_fingerprint(vq, spec, images)}.pt"
    if path.is_file():
        codes = torch.load(path, weights_only=True)
        if codes.shape == (len(images), n_codes):
            return codes
    log.info(f"encoding {len(images)} images with data.vq={spec} (cached in {path})")
    codes = torch.cat([encode_images(vq, images.render(np.arange(i, min(i + chunk, len(images)))), n_codes)
                       for i in range(0, len(images), chunk)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(codes, tmp)
    os.replace(tmp, path)  # atomic: a concurrent rank or a killed run never reads half a file
    return codes


def collate_tokens(rows: list[list[Document]], seq_len: int, pad_id: int, codes: Tensor, vocab_size: int,
                   patch_dim: int) -> MixedBatch:
    """Rows of documents -> a MixedBatch of tokens only (module docstring). codes: (N_set, n) per set image."""
    B, L = len(rows), seq_len
    tokens = np.full((B, L), pad_id, dtype=np.int64)
    doc_ids = np.zeros((B, L), dtype=np.int64)
    positions = np.zeros((B, L), dtype=np.int64)
    codes_np = codes.numpy()
    for b, row in enumerate(rows):
        at = 0
        for d, doc in enumerate(row):
            n = len(doc)
            ids = doc.tokens.copy()
            for k, start in zip(doc.images, doc.image_starts):
                span = codes_np[k]  # (n_codes,)
                assert (ids[start:start + len(span)] == PATCH).all(), "image span and code count disagree"
                ids[start:start + len(span)] = span + vocab_size
            tokens[b, at:at + n] = ids
            doc_ids[b, at:at + n] = d
            positions[b, at:at + n] = np.arange(n)
            at += n
        if at < L:  # the padding document
            doc_ids[b, at:] = len(row)
            positions[b, at:] = np.arange(L - at)
    t = torch.from_numpy(tokens)
    d = torch.from_numpy(doc_ids)
    no_img = torch.full_like(t, -1)
    return MixedBatch(tokens=t, image_ids=no_img, doc_ids=d, positions=torch.from_numpy(positions),
                      lm_targets=make_lm_targets(t, no_img, d, t != pad_id),
                      patches=torch.zeros(0, patch_dim), image_max_t=torch.zeros(0, dtype=torch.long))


class ChameleonLoader(Loader):
    """Transfusion's Loader (same plan, sharding, resume state) with token rows instead of patches."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, sources, codes: Tensor | None, split: str = "train",
                 rank: int = 0, world_size: int = 1):
        super().__init__(cfg, tokenizer, sources, split, rank, world_size)
        self.codes = codes if codes is not None else torch.zeros(0, cfg.model.patches_per_image, dtype=torch.long)

    def batch_at(self, step: int) -> MixedBatch:
        rows = self.plan(step)[self.rank * self.rows:(self.rank + 1) * self.rows]
        m = self.cfg.model
        batch = collate_tokens(rows, self.seq_len, self.specials.pad, self.codes, m.vocab_size, m.patch_dim)
        batch.validate(m.patch_dim, m.patches_per_image, m.vocab_size + m.codebook_size)
        return batch


def build_chameleon_loader(cfg: Config, tokenizer: Tokenizer, split: str = "train", rank: int = 0,
                           world_size: int = 1, vq: Quantizer | None = None) -> ChameleonLoader:
    """The loader of a `model.family = "chameleon"` run; `vq` defaults to `load_vq(cfg)` (data.vq)."""
    sources = load_sources(cfg, tokenizer, split)
    codes = None
    if sources.images is not None:
        if not isinstance(sources.images, ImageTextSet):
            raise ConfigError(f"the Chameleon baseline trains on image-caption data, not {cfg.data.dataset!r}")
        vq = vq or load_vq(cfg)
        codes = image_codes(vq, cfg.data.vq, sources.images, cfg.model.patches_per_image)
    return ChameleonLoader(cfg, tokenizer, sources, codes, split, rank, world_size)
