"""The record stream of one rank: shards split over (rank, worker) slots, a shuffle buffer per slot, and a
position that is small JSON (checkpointed with the trainer) and can be re-split for another world size.

Schedule. Epoch e orders the split's shards by a permutation seeded with (seed, e); with S = world_size *
workers slots, slot s = rank * workers + worker reads shards perm_e[s], perm_e[s + S], ... (round-robin), so no
two slots ever read the same shard in an epoch, and together they read every shard once. A slot reads its
shards in order into a shuffle buffer of `buffer` records and emits a uniformly drawn one; when its shards for
the epoch are exhausted it drains the buffer, then starts epoch e + 1. A rank takes records from its workers'
slots in turn (worker 0, 1, ..., 0, ...). Workers are logical streams in the trainer's process: the split and
the guarantees do not depend on how many processes decode (see docs/data.md for the measured rates).

Position (`state_dict`). Per slot: epoch, the queue of (shard, next ordinal) still to read in this epoch, the
keys (shard, ordinal) of the records in its buffer, the RNG state; per rank: keys of records taken out of the
stream but not yet used (a batch's last image that did not fit, `hold`). Records are named by key and re-read on
restore, so the position never holds pixels.

Guarantees.
- Same world size and workers: the restored stream is identical (same buffers, same RNG), so the batches, and
  the trainer's losses, are exactly those of an uninterrupted run.
- Another world size (or worker count): `reshard` gathers every slot's unfinished work (the rest of each
  partly read shard, the shards of its epoch not yet started, those of later epochs other slots already
  entered) and every buffered or held record, and deals them round-robin to the new slots, which then continue
  with the next epoch under the new split. Hence every record of every epoch up to the furthest one reached is
  emitted exactly once (records skipped as damaged: never), no shard is read twice within an epoch, and none
  is dropped. What changes is the order, not the set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from transfusion.data.image_text import SkipStats
from transfusion.data.shards_reader import Damage, Record, ShardError, ShardIndex, decode, iter_raw

Key = tuple[int, int]  # (shard number in the split, ordinal in the shard)


def epoch_order(seed: int, epoch: int, n_shards: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5AD]).permutation(n_shards)


def slot_shards(seed: int, epoch: int, n_shards: int, slot: int, n_slots: int) -> list[int]:
    return [int(i) for i in epoch_order(seed, epoch, n_shards)[slot::n_slots]]


@dataclass
class ShardSource:
    """Decoded records of one split's shards."""

    index: ShardIndex
    split: str
    tokenizer: Any
    max_tokens: int

    @property
    def n_shards(self) -> int:
        return len(self.index.shards(self.split))

    def path(self, shard: int) -> Path:
        return self.index.path(self.split, shard)

    def records(self, shard: int, start: int = 0, only: set[int] | None = None) -> Iterator[Record | Damage]:
        for raw in iter_raw(self.path(shard), start, only):
            if isinstance(raw, Damage):
                yield raw
            else:
                yield decode(raw, shard, self.index.image_size, self.tokenizer, self.max_tokens)

    def reread(self, keys: list[Key], stats: SkipStats) -> dict[Key, Record]:
        """Records by key (a checkpointed buffer); one pass per shard. A key that no longer decodes (the file
        changed since the checkpoint) is counted and left out."""
        by_shard: dict[int, set[int]] = {}
        for s, o in keys:
            by_shard.setdefault(s, set()).add(o)
        found: dict[Key, Record] = {}
        for s, ords in sorted(by_shard.items()):
            for rec in self.records(s, only=ords):
                if isinstance(rec, Record):
                    found[rec.key] = rec
        for k in keys:
            if k not in found:
                stats.skip("changed_since_checkpoint", f"shard {k[0]} record {k[1]}")
        return found


@dataclass
class SlotState:
    """JSON form of a slot's position (see the module docstring)."""

    slot: int
    epoch: int
    queue: list[list[int]]  # [shard, next ordinal] still to read this epoch, head first
    buffer: list[list[int]]  # keys of the buffered records, in buffer order
    rng: dict | None = None  # numpy bit-generator state; None: seed a fresh one from (seed, slot, epoch)
    idle_epochs: int = 0  # consecutive epochs without a single record: all of this slot's shards are damaged

    def to_json(self) -> dict:
        return dict(self.__dict__)


class SlotStream:
    """One (rank, worker) slot: its shards in order through a shuffle buffer."""

    def __init__(self, source: ShardSource, seed: int, n_slots: int, buffer: int, state: SlotState,
                 stats: SkipStats, records: dict[Key, Record] | None = None):
        self.source, self.seed, self.n_slots, self.size = source, seed, n_slots, max(1, buffer)
        self.state, self.stats = state, stats
        self.rng = np.random.default_rng([seed, state.slot, state.epoch, 0xB0F])
        if state.rng is not None:
            self.rng.bit_generator.state = state.rng
        records = records or {}
        self.buffer: list[Record] = [records[k] for k in map(tuple, state.buffer) if k in records]
        self._reader: Iterator[Record | Damage] | None = None
        self._read_any = False

    def _read_one(self) -> Record | None:
        """The next record of this epoch's queue, or None when the queue is done."""
        q = self.state.queue
        while q:
            if self._reader is None:
                self._reader = self.source.records(q[0][0], start=q[0][1])
            for item in self._reader:
                if isinstance(item, Damage):
                    self.stats.skip(item.reason, item.where)
                    if item.ordinal is not None:  # a record skipped for its content: the position passes it
                        q[0][1] = item.ordinal + 1
                    continue
                q[0][1] = item.key[1] + 1
                self._read_any = True
                return item
            self._reader = None
            q.pop(0)
        return None

    def _next_epoch(self) -> None:
        st = self.state
        st.idle_epochs = 0 if self._read_any else st.idle_epochs + 1
        if st.idle_epochs >= 2:
            raise ShardError(f"slot {st.slot}: two epochs of its shards gave no readable record; "
                             f"{self.stats.summary()}")
        st.epoch += 1
        self._read_any = False
        st.queue = [[i, 0] for i in slot_shards(self.seed, st.epoch, self.source.n_shards, st.slot, self.n_slots)]

    def next(self) -> Record:
        for _ in range(3):  # the queue, then at most two fresh epochs (the second one raises if idle)
            while len(self.buffer) < self.size:
                rec = self._read_one()
                if rec is None:
                    break
                self.buffer.append(rec)
            if self.buffer:
                i = int(self.rng.integers(len(self.buffer)))
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                return self.buffer.pop()
            self._next_epoch()
        raise ShardError(f"slot {self.state.slot}: no readable record")  # unreachable: _next_epoch raises

    def state_dict(self) -> dict:
        st = self.state
        st.buffer = [list(r.key) for r in self.buffer]
        st.rng = self.rng.bit_generator.state
        return st.to_json()


# ------------------------------------------------------------------------------------------ one rank


@dataclass
class RankStream:
    """The records of one rank: its workers' slots in turn, records put back first (`hold`)."""

    source: ShardSource
    seed: int
    rank: int
    world_size: int
    workers: int
    buffer: int
    stats: SkipStats = field(default_factory=SkipStats)
    slots: list[SlotStream] = field(default_factory=list)
    held: list[Record] = field(default_factory=list)
    turn: int = 0

    def __post_init__(self) -> None:
        n = self.world_size * self.workers
        if self.source.n_shards < n:
            raise ShardError(f"{self.source.n_shards} {self.source.split} shard(s) cannot feed world_size "
                             f"{self.world_size} x data.loader_workers {self.workers} = {n} streams without "
                             "overlap; re-shard with a smaller --shard-size or lower data.loader_workers")
        if not self.slots:
            self.slots = [self._fresh(self.rank * self.workers + w) for w in range(self.workers)]

    def _fresh(self, slot: int) -> SlotStream:
        n = self.world_size * self.workers
        queue = [[i, 0] for i in slot_shards(self.seed, 0, self.source.n_shards, slot, n)]
        return SlotStream(self.source, self.seed, n, self.buffer, SlotState(slot, 0, queue, []), self.stats)

    def next(self) -> Record:
        if self.held:
            return self.held.pop(0)
        slot = self.slots[self.turn % len(self.slots)]
        self.turn += 1
        return slot.next()

    def hold(self, records: list[Record]) -> None:
        """Put records taken but not used back in front of the stream (they come out first, in order)."""
        self.held = list(records) + self.held

    def state_dict(self) -> dict:
        return {"rank": self.rank, "turn": self.turn, "held": [list(r.key) for r in self.held],
                "slots": [s.state_dict() for s in self.slots], "skipped": dict(self.stats.counts),
                "used": self.stats.used}

    def load(self, ranks: list[dict], world_size: int, workers: int) -> None:
        """Restore from every rank's state (saved at `world_size` x `workers`); re-split if those differ."""
        if world_size == self.world_size and workers == self.workers:
            mine = ranks[self.rank]
            slot_states = [SlotState(**s) for s in mine["slots"]]
            held, self.turn = [tuple(k) for k in mine["held"]], int(mine["turn"])
        else:
            slot_states = reshard(ranks, world_size * workers, self.world_size * self.workers,
                                  self.source.n_shards, self.seed, self.rank, self.workers)
            held, self.turn = [], 0  # every old held record is in some new slot's buffer
        if world_size == self.world_size:
            self.stats.counts.update(ranks[self.rank]["skipped"])
            self.stats.used += int(ranks[self.rank].get("used", 0))
        elif self.rank == 0:  # re-split: rank 0 carries every old rank's counts, so none is lost or doubled
            for r in ranks:
                self.stats.counts.update(r["skipped"])
                self.stats.used += int(r.get("used", 0))
        keys = held + [tuple(k) for s in slot_states for k in s.buffer]
        records = self.source.reread(keys, self.stats)  # type: ignore[arg-type]
        self.held = [records[k] for k in held if k in records]
        n = self.world_size * self.workers
        self.slots = [SlotStream(self.source, self.seed, n, self.buffer, s, self.stats, records)
                      for s in slot_states]


def reshard(ranks: list[dict], old_slots: int, new_slots: int, n_shards: int, seed: int, rank: int,
            workers: int) -> list[SlotState]:
    """The slot states of `rank` after dealing the old slots' unfinished work over
    `new_slots` slots (module docstring, "Another world size")."""
    old = sorted((SlotState(**s) for r in ranks for s in r["slots"]), key=lambda s: s.slot)
    if [s.slot for s in old] != list(range(old_slots)):
        raise ShardError(f"the checkpointed loader state names slots {[s.slot for s in old]}, "
                         f"expected 0..{old_slots - 1}")
    last = max(s.epoch for s in old)
    pending: list[list[int]] = []
    for e in range(min(s.epoch for s in old), last + 1):
        for s in old:
            if s.epoch == e:
                pending += [list(u) for u in s.queue]
            elif s.epoch < e:
                pending += [[i, 0] for i in slot_shards(seed, e, n_shards, s.slot, old_slots)]
    loose = [list(k) for r in ranks for k in r["held"]] + [list(k) for s in old for k in s.buffer]
    mine = [rank * workers + w for w in range(workers)]
    return [SlotState(t, last, pending[t::new_slots], loose[t::new_slots]) for t in mine]

