"""The training/evaluation data loader: an infinite, deterministic, rank-sharded stream of MixedBatch.

Batch `step` is a pure function of (train.seed, split, step): the global batch of `train.batch_size` rows is
planned from an RNG seeded with those three numbers, and rank r keeps rows [r*b, (r+1)*b) with
b = batch_size // world_size. Hence:
- ranks never overlap, and the union of their slices is exactly the world_size=1 batch;
- resuming needs only the step (`state_dict`), and a run may resume on a different number of ranks;
- only the rank's own images are rendered; planning the whole global batch is a few hundred microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transfusion.batch import MixedBatch
from transfusion.config import Config, ConfigError
from transfusion.data.edits import EditSet
from transfusion.data.image_text import ImageTextSet, SkipStats
from transfusion.data.mixture import DocumentSampler, MixtureSpec
from transfusion.data.packing import collate, pack_rows
from transfusion.data.registry import get_dataset
from transfusion.data.sequences import Specials
from transfusion.data.text_corpus import TokenCorpus
from transfusion.data.text_files import text_corpus
from transfusion.tokenizer import Tokenizer

SPLITS = {"train": 0, "test": 1}
MAX_TEXT_TOKENS = 254  # longest text passage: a text document is at most 256 positions (BOS + 254 + EOS)


@dataclass
class DataSources:
    images: ImageTextSet | EditSet | None
    corpus: TokenCorpus | None
    stats: SkipStats
    sampler: type[DocumentSampler] = DocumentSampler  # draws the documents: the dataset's document_sampler


def load_sources(cfg: Config, tokenizer: Tokenizer, split: str) -> DataSources:
    """Images (the dataset `data.dataset` names) and text (`data.text_files`, else Shakespeare) of a split."""
    d, m = cfg.data, cfg.model
    stats = SkipStats()
    images: ImageTextSet | EditSet | None = None
    sampler: type[DocumentSampler] = DocumentSampler
    if d.text_ratio < 1:
        dataset = get_dataset(d)
        if d.vae:  # the dataset's pixels at the autoencoder's input size, then its cached latents
            from transfusion.autoencoder.codec import image_codec
            from transfusion.data.latent_images import latent_image_set

            if dataset.document_sampler is not DocumentSampler:
                raise ConfigError(f"data.vae: latent images are built for image-caption datasets; the "
                                  f"{d.dataset!r} dataset makes other documents (edits) and needs pixels")
            pixels, stats = dataset.image_set(tokenizer, split, image_codec(cfg).pixel_size, 3)
            images = latent_image_set(cfg, pixels, split)
        else:
            images, stats = dataset.image_set(tokenizer, split, m.image_size, m.image_channels)
        sampler = dataset.document_sampler
    corpus = text_corpus(d, tokenizer, split) if d.text_ratio > 0 else None
    return DataSources(images, corpus, stats, sampler)


class Loader:
    """Iterate to get MixedBatch; `batch_at(step)` is random access; see the module docstring."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, sources: DataSources, split: str = "train",
                 rank: int = 0, world_size: int = 1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, not {split!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        bs = cfg.train.batch_size
        if bs <= 0 or bs % world_size:
            raise ConfigError(f"train.batch_size={bs} must be a positive multiple of world_size={world_size}")
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                              f"{cfg.model.vocab_size}; raise model.vocab_size or use a smaller tokenizer")
        self.cfg, self.sources, self.split = cfg, sources, split
        self.rank, self.world_size = rank, world_size
        self.rows = bs // world_size
        self.seq_len = cfg.data.seq_len
        self.specials = Specials.of(tokenizer)
        self.spec = MixtureSpec(
            text_ratio=cfg.data.text_ratio, image_first_prob=cfg.data.image_first_prob,
            caption_dropout=cfg.data.caption_dropout, patches_per_image=cfg.model.patches_per_image,
            num_train_steps=cfg.diffusion.num_train_steps, noise_limit=cfg.diffusion.noise_limit,
            max_text_tokens=min(MAX_TEXT_TOKENS, self.seq_len - 2),
            interleaved_prob=cfg.data.interleaved_prob,
        )
        self._check_fits()
        self.step = 0

    def _check_fits(self) -> None:
        p = self.spec.interleaved_prob
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"data.interleaved_prob={p}: expected a probability in [0, 1]")
        images = self.sources.images
        if images is None:
            return
        if isinstance(images, EditSet):  # BOS instruction (BOI patches EOI) x 2 EOS
            longest = images.longest_document(self.spec.patches_per_image)
        else:
            longest = 4 + self.spec.patches_per_image + images.max_caption_len()  # BOS BOI EOI EOS
        if p > 0:
            if images.interleaved is None:
                raise ConfigError(
                    f"data.interleaved_prob={p}, but the {self.cfg.data.dataset!r} dataset has no interleaved-"
                    "document templates, so it never makes interleaved documents; set data.interleaved_prob = 0")
            # BOS (BOI patches EOI) x 2 EOS around the text
            longest = max(longest, 6 + 2 * self.spec.patches_per_image + images.interleaved.max_len())
        if longest > self.seq_len:
            raise ConfigError(f"an image document needs up to {longest} positions but data.seq_len="
                              f"{self.seq_len}; raise data.seq_len or lower data.max_caption_tokens")

    @property
    def stats(self) -> SkipStats:
        return self.sources.stats

    def plan(self, step: int) -> list:
        """The documents of every row of global batch `step` (all ranks), without rendering images."""
        rng = np.random.default_rng([self.cfg.train.seed, SPLITS[self.split], step])
        sampler = self.sources.sampler(rng, self.spec, self.specials, self.sources.images, self.sources.corpus)
        return pack_rows(sampler, self.rows * self.world_size, self.seq_len)

    def batch_at(self, step: int) -> MixedBatch:
        rows = self.plan(step)[self.rank * self.rows:(self.rank + 1) * self.rows]
        m = self.cfg.model
        batch = collate(rows, self.seq_len, self.specials.pad, self.sources.images, m.patch_size, m.image_channels)
        batch.validate(m.patch_dim, m.patches_per_image, m.vocab_size)  # a data bug fails here, named, not in a step
        return batch

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> MixedBatch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """The global step is all there is to resume (world-size independent); the rest is for checks."""
        return {"step": self.step, "seed": self.cfg.train.seed, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.cfg.train.seed) != self.cfg.train.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run has {self.cfg.train.seed}")
        self.step = int(state["step"])


def build_loader(cfg: Config, tokenizer: Tokenizer, split: str = "train", rank: int = 0,
                 world_size: int = 1) -> Loader:
    """The loader of the contracts (docs/contracts.md); loads and caches its data sources."""
    return Loader(cfg, tokenizer, load_sources(cfg, tokenizer, split), split, rank, world_size)
