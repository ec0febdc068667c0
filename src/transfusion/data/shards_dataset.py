"""`data.dataset = "shards"`: image-caption shards made by `transfusion shard` (data.folder = SHARDS/).

Training streams the train split (shards_loader.ShardLoader, chosen by train/loop.py): memory holds the
shuffle buffers, never the set. What this class gives the rest of the project reads only bounded amounts:
- `image_set(split)`: every record of a split in memory, for the validation split (the held-out images of the
  evaluation and of `split="test"` loaders) and small sets; "test" means the shard set's "val" split;
- `sample_prompts` / `examples`: the first records of the validation split (else of the training split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from transfusion.config import ConfigError
from transfusion.data.dataset import Dataset, Examples
from transfusion.data.image_text import ImageTextSet, SkipStats
from transfusion.data.shards_reader import Record, ShardError, ShardIndex, load_index
from transfusion.data.shards_stream import ShardSource
from transfusion.images import from_uint8

SHARD_SPLIT = {"train": "train", "test": "val"}  # the loaders' split names -> the shard set's


def read_split(source: ShardSource, stats: SkipStats, limit: int | None = None) -> list[Record]:
    """The records of a split in shard order (at most `limit`); damaged ones counted in `stats`."""
    out: list[Record] = []
    for shard in range(source.n_shards):
        for rec in source.records(shard):
            if isinstance(rec, Record):
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    return out
            else:
                stats.skip(rec.reason, rec.where)
    return out


class ShardsDataset(Dataset):
    name = "shards"

    def _index(self) -> ShardIndex:
        if not self.data.folder:
            raise ConfigError('data.dataset = "shards" needs data.folder = SHARDS/ (made by `transfusion shard`)')
        return load_index(Path(self.data.folder))

    def _source(self, split: str, tokenizer, image_size: int) -> ShardSource:
        index = self._index()
        index.image_size = image_size  # records are resized by images.read_uint8 (the one rule)
        return ShardSource(index, SHARD_SPLIT.get(split, split), tokenizer, self.data.max_caption_tokens)

    def image_set(self, tokenizer, split: str, image_size: int, channels: int) -> tuple[ImageTextSet, SkipStats]:
        self.require_rgb(channels)
        source = self._source(split, tokenizer, image_size)
        stats = SkipStats()
        records = read_split(source, stats)
        if not records:
            raise ShardError(f"the {source.split!r} split of {source.index.root} has no usable record "
                             f"(make one with `transfusion shard --val-fraction`); {stats.summary()}")
        stats.used = len(records)
        images = ImageTextSet(pixels=torch.from_numpy(np.stack([r.pixels for r in records])),
                              caption_of=np.arange(len(records), dtype=np.int64),
                              caption_sets=[r.captions for r in records], image_size=image_size,
                              name=f"shards:{source.index.root}:{source.split}")
        return images, stats

    def _first_records(self, n: int, image_size: int, tokenizer=None) -> tuple[list[Record], list[list[str]]]:
        """Up to `n` records of the val split (else train) with their caption texts."""
        from transfusion.tokenizer import Tokenizer

        tokenizer = tokenizer or Tokenizer.load(self.data.tokenizer or None)
        for split in ("val", "train"):
            source = self._source(split, tokenizer, image_size)
            records = read_split(source, SkipStats(), limit=n)
            if records:
                return records, [[tokenizer.decode(c.tolist()) for c in r.captions] for r in records]
        return [], []

    def sample_prompts(self, n: int) -> list[str]:
        """The first caption of the first `n` records of the validation split (else the training split)."""
        if n <= 0:
            return []
        _, captions = self._first_records(n, image_size=8)  # pixels unused: decode them small
        return [c[0] for c in captions]

    def examples(self, split: str, n: int, seed: int, image_size: int) -> Examples | None:
        records, captions = self._first_records(n, image_size)
        if not records:
            return None
        return Examples(images=from_uint8(np.stack([r.pixels for r in records])), captions=[c[0] for c in captions])

    def describe(self) -> str:
        index = self._index()
        return (f"shards {index.root} ({index.records('train')} train / {index.records('val')} val records in "
                f"{len(index.shards('train'))} + {len(index.shards('val'))} shards)")
