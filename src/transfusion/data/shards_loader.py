"""The trainer's loader over shards (`data.dataset = "shards"`, chosen by train/loop.py; `build_loader(split=
"test")` gives the usual in-memory loader over the val split): the batches of loader.Loader, with images
taken in stream order from this rank's RankStream (shards_stream.py) instead of drawn at random from memory.

What stays as in loader.Loader: the mixture of text and image documents, packing, collation, validation, the
per-rank batch of `batch_size / world_size` rows and the iterator protocol. What differs:
- each rank packs its own rows from its own records (ranks share no data, so no rank reads another's shards);
  the document choices (caption alternative, layout, text passages) use an RNG of (seed, split, step, rank);
- an image document that did not fit the last row is put back in front of the stream, so no record taken
  out of the stream is lost;
- batches come in order only (a stream has no random access), and the position is every rank's stream
  state, gathered into the one train_state.json the trainer writes (rank 0), as JSON: nothing unpickled.
Only the memory of the shuffle buffers and one batch is used, whatever the size of the shard set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from transfusion.batch import MixedBatch
from transfusion.config import Config, ConfigError
from transfusion.data.image_text import ImageTextSet, SkipStats
from transfusion.data.loader import SPLITS, DataSources, Loader
from transfusion.data.mixture import DocumentSampler, MixtureSpec
from transfusion.data.packing import collate, pack_rows
from transfusion.data.sequences import Document, Specials, choose_layout, image_document
from transfusion.data.shards_dataset import SHARD_SPLIT
from transfusion.data.shards_reader import Record, load_index
from transfusion.data.shards_stream import Key, RankStream, ShardSource
from transfusion.data.text_corpus import TokenCorpus
from transfusion.data.text_files import text_corpus

class _Window:
    """The records one batch took from the stream; a document's image index is its position here."""

    def __init__(self, stream: RankStream):
        self.stream = stream
        self.records: list[Record] = []

    def pull(self) -> tuple[int, Record]:
        self.records.append(self.stream.next())
        return len(self.records) - 1, self.records[-1]

    def image_set(self, image_size: int) -> ImageTextSet | None:
        if not self.records:
            return None
        return ImageTextSet(pixels=torch.from_numpy(np.stack([r.pixels for r in self.records])),
                            caption_of=np.arange(len(self.records), dtype=np.int64),
                            caption_sets=[r.captions for r in self.records], image_size=image_size, name="shards")


class StreamSampler(DocumentSampler):
    """DocumentSampler whose image documents take the stream's next record instead of a random index."""

    def __init__(self, rng: np.random.Generator, spec: MixtureSpec, sp: Specials, window: _Window,
                 corpus: TokenCorpus | None):
        if spec.text_ratio > 0 and corpus is None:
            raise ValueError("data.text_ratio > 0 needs a text corpus")
        self.rng, self.spec, self.sp, self.images, self.corpus = rng, spec, sp, None, corpus
        self.window = window
        self.text_tokens = 0
        self.image_tokens = 0

    def image(self) -> Document:
        k, rec = self.window.pull()
        caption = rec.captions[int(self.rng.integers(len(rec.captions)))]  # one of the record's captions
        s = self.spec
        layout = choose_layout(self.rng, s.image_first_prob, s.caption_dropout)
        doc = image_document(caption, k, s.patches_per_image, layout, self.sp, s.num_train_steps, s.noise_limit)
        self.image_tokens += len(doc)
        return doc


def gather_json(obj: dict) -> list[dict]:
    """Every rank's `obj`, in rank order, on every rank (JSON bytes in a uint8 tensor: no pickling)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[:int(n.item())].cpu().tolist()).decode()) for p, n in zip(parts, sizes)]


class ShardLoader(Loader):
    """Iterate to get this rank's MixedBatch of each step, in order; see the module docstring."""

    def __init__(self, cfg: Config, tokenizer, split: str = "train", rank: int = 0, world_size: int = 1):
        d = cfg.data
        if not d.folder:
            raise ConfigError('data.dataset = "shards" needs data.folder = SHARDS/ (made by `transfusion shard`)')
        if d.shuffle_buffer < 1 or d.loader_workers < 1:
            raise ConfigError(f"data.shuffle_buffer={d.shuffle_buffer} and data.loader_workers={d.loader_workers} "
                              "must be >= 1")
        if getattr(d, "vae", ""):  # latents are cached per in-memory set (data/latent_images.py), not per stream
            raise ConfigError("data.vae with data.dataset = \"shards\" is not supported yet: stream pixels "
                              "(data.vae = \"\") or use the folder dataset for latent training")
        if d.interleaved_prob > 0:
            raise ConfigError("data.interleaved_prob > 0, but shards have no interleaved-document templates; "
                              "set data.interleaved_prob = 0")
        corpus = text_corpus(d, tokenizer, split) if d.text_ratio > 0 else None  # data.text_files or Shakespeare
        super().__init__(cfg, tokenizer, DataSources(None, corpus, SkipStats()), split, rank, world_size)
        longest = 4 + cfg.model.patches_per_image + d.max_caption_tokens  # BOS BOI EOI EOS
        if longest > self.seq_len and d.text_ratio < 1:
            raise ConfigError(f"an image document needs up to {longest} positions but data.seq_len={self.seq_len}; "
                              "raise data.seq_len or lower data.max_caption_tokens")
        source = ShardSource(load_index(Path(d.folder)), SHARD_SPLIT[split], tokenizer, d.max_caption_tokens)
        self.image_size = cfg.model.image_size  # records are resized by images.read_uint8 (the one rule)
        source.index.image_size = self.image_size
        self.stream = RankStream(source, cfg.train.seed, rank, world_size, d.loader_workers, d.shuffle_buffer,
                                 stats=self.sources.stats)
        self.last_keys: list[Key] = []  # the records of the last batch, in batch-image order (tests, audits)

    def batch_at(self, step: int) -> MixedBatch:
        """The batch at the stream's position; `step` must be the next one (no random access on a stream)."""
        if step != self.step:
            raise ValueError(f"a shard stream gives batches in order: asked for step {step} at step {self.step}")
        rng = np.random.default_rng([self.cfg.train.seed, SPLITS[self.split], step, self.rank])
        window = _Window(self.stream)
        sampler = StreamSampler(rng, self.spec, self.specials, window, self.sources.corpus)
        rows = pack_rows(sampler, self.rows, self.seq_len)
        picked = [k for row in rows for doc in row for k in doc.images]  # collate's batch-image order
        unused = sorted(set(range(len(window.records))) - set(picked))
        self.stream.hold([window.records[i] for i in unused])  # a last image that did not fit: next batch
        m = self.cfg.model
        batch = collate(rows, self.seq_len, self.specials.pad, window.image_set(self.image_size), m.patch_size,
                        m.image_channels)
        batch.validate(m.patch_dim, m.patches_per_image, m.vocab_size)
        self.last_keys = [window.records[k].key for k in picked]
        self.sources.stats.used += len(picked)  # "used" of the skip report: records trained on (this rank)
        return batch

    def state_dict(self) -> dict:
        """Collective under torchrun (every rank calls it when the trainer saves): all ranks' positions."""
        return {"step": self.step, "seed": self.cfg.train.seed, "split": self.split, "kind": "shards",
                "world_size": self.world_size, "workers": self.stream.workers,
                "ranks": gather_json(self.stream.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "shards":
            raise ValueError("the checkpoint's loader did not stream shards; a run cannot switch to shards on resume")
        if state.get("seed", self.cfg.train.seed) != self.cfg.train.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run has {self.cfg.train.seed}")
        self.step = int(state["step"])
        self.stream.load(state["ranks"], int(state["world_size"]), int(state["workers"]))
