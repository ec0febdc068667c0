"""Reading image-caption shards (written by shards_writer.py): the index, and records out of one tar shard.

A shard is a plain POSIX tar in the webdataset convention: consecutive members sharing a key form one record,
`KEY.png` (the image, already centre-cropped and resized) and `KEY.json` ({"captions": [...]}). Any tar reader
or the `webdataset` package reads them; this module reads them itself, header by header, because it must
survive damage that `tarfile` stops at:

- a record whose image or JSON does not decode: skipped and counted, the next record is read;
- a damaged member header (bad checksum) in the middle of a shard: counted, and the reader resynchronises on
  the next 512-byte block that parses as a valid header, so the rest of the shard is still read;
- a truncated shard (the file ends inside a header or a member's data): counted once, the records before the
  cut are kept.

Records are numbered by their position in the shard (`ordinal`): a (shard, ordinal) key names a record across
processes and resumes, and `start` skips the first records by reading headers only (seeking over data).
Nothing here unpickles: images go through Pillow (images.read_uint8, the project's one resize rule) and
captions through `json`.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from transfusion.images import ImageReadError, read_uint8

INDEX_FILE = "index.json"  # written last and atomically: a directory without it is not a finished shard set
REPORT_FILE = "report.json"  # what `transfusion shard` skipped, by reason
FORMAT = "transfusion-shards-1"
SPLITS = ("train", "val")
BLOCK = 512  # tar block size
IMAGE_EXT, CAPTION_EXT = "png", "json"


class ShardError(ValueError):
    """A shard directory that cannot be used at all (no index, an unreadable index, no shard of a split)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the shard directory
    records: int
    bytes: int
    sha256: str


@dataclass
class ShardIndex:
    root: Path
    image_size: int
    splits: dict[str, list[ShardInfo]]

    def shards(self, split: str) -> list[ShardInfo]:
        return self.splits.get(split, [])

    def path(self, split: str, i: int) -> Path:
        return self.root / self.shards(split)[i].name

    def records(self, split: str) -> int:
        return sum(s.records for s in self.shards(split))


def load_index(root: str | Path) -> ShardIndex:
    """DIR/index.json -> ShardIndex; ShardError names what is wrong."""
    root = Path(root)
    path = root / INDEX_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path} not found: make shards with `transfusion shard DIR_OR_JSONL --out {root}`") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ShardError(f"{path} is unreadable ({e})") from None
    try:
        if meta["format"] != FORMAT:
            raise ShardError(f"{path}: format {meta['format']!r}, expected {FORMAT!r}")
        splits = {s: [ShardInfo(str(d["name"]), int(d["records"]), int(d["bytes"]), str(d["sha256"]))
                      for d in meta["splits"].get(s, [])] for s in SPLITS}
        return ShardIndex(root, int(meta["image_size"]), splits)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"{path} is not a shard index ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------ tar members


@dataclass
class Damage:
    """Something the reader skipped: `reason` for SkipStats, `where` for its examples."""

    reason: str  # truncated_shard | corrupt_header | missing_shard | a decode reason (see `decode`)
    where: str
    ordinal: int | None = None  # the record skipped, when the damage is one record's content


@dataclass
class RawRecord:
    ordinal: int
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes ({} when skipped by `start`)


def _header(block: bytes) -> tarfile.TarInfo | None:
    """A 512-byte block -> TarInfo, or None when it is not a valid header (bad checksum, garbage)."""
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except (tarfile.HeaderError, ValueError, UnicodeError, OverflowError):
        return None


def _members(f: BinaryIO, size: int, where: str, want) -> Iterator[tuple[str, bytes | None] | Damage]:
    """(name, data) of each regular member, data None unless `want(name)`; Damage for what was skipped."""
    pos, resyncing = 0, False
    while pos + BLOCK <= size:
        f.seek(pos)
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            break
        if block == bytes(BLOCK):  # end-of-archive marker (two zero blocks); padding after it is ignored
            return
        info = _header(block)
        if info is None:
            if not resyncing:  # one count per damaged stretch, not per block scanned
                yield Damage("corrupt_header", f"{where} @ {pos}")
            resyncing = True
            pos += BLOCK
            continue
        resyncing = False
        data_at, padded = pos + BLOCK, -(-info.size // BLOCK) * BLOCK
        if data_at + info.size > size:
            yield Damage("truncated_shard", f"{where} ({info.name} ends past the file's {size} bytes)")
            return
        if info.isreg():
            data = None
            if want(info.name):
                f.seek(data_at)
                data = f.read(info.size)
            yield info.name, data
        pos = data_at + padded
    if pos < size and not resyncing:
        yield Damage("truncated_shard", f"{where} (ends inside a header at {pos})")


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000123.png' -> ('dir/000123', 'png'): the webdataset rule, the key ends at the first dot of the
    base name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def iter_raw(path: Path, start: int = 0, only: set[int] | None = None) -> Iterator[RawRecord | Damage]:
    """The records of one shard in order, from ordinal `start` (earlier ones cost a header read each); with
    `only`, just those ordinals are read (re-reading a checkpointed shuffle buffer)."""
    where = path.name
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Damage("missing_shard", f"{where} ({e.strerror})")
        return
    with f:
        size = f.seek(0, io.SEEK_END)
        current: RawRecord | None = None
        ordinal = -1

        def wanted(name: str) -> bool:
            o = ordinal if current is not None and _split_name(name)[0] == current.key else ordinal + 1
            return o >= start and (only is None or o in only)

        for item in _members(f, size, where, wanted):
            if isinstance(item, Damage):
                yield item
                continue
            name, data = item
            key, ext = _split_name(name)
            if current is None or key != current.key:
                if current is not None and _kept(current, start, only):
                    yield current
                ordinal += 1
                current = RawRecord(ordinal, key)
            if data is not None:
                current.members[ext] = data
        if current is not None and _kept(current, start, only):
            yield current


def _kept(rec: RawRecord, start: int, only: set[int] | None) -> bool:
    return rec.ordinal >= start and (only is None or rec.ordinal in only)


# ------------------------------------------------------------------------------------------ decoding


@dataclass
class Record:
    """One decoded image-caption record; `key` = (shard number in its split, ordinal in the shard)."""

    key: tuple[int, int]
    pixels: np.ndarray  # (3, S, S) uint8
    captions: list[np.ndarray]  # token ids of each usable caption (>= 1), specials excluded


def parse_captions(data: bytes | None) -> list[str] | None:
    """A record's JSON -> its non-empty captions, or None when the JSON is unusable."""
    if data is None:
        return None
    try:
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # ValueError covers UnicodeDecodeError and JSONDecodeError
        return None
    caps = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(caps, list):
        return None
    return [c.strip() for c in caps if isinstance(c, str) and c.strip()]


def decode(raw: RawRecord, shard: int, image_size: int, tokenizer, max_tokens: int) -> Record | Damage:
    """RawRecord -> Record, or Damage naming why it is skipped. Captions longer than `max_tokens` under this
    run's tokenizer are dropped one by one; a record left without any is skipped."""
    where = f"shard {shard} record {raw.ordinal} ({raw.key})"
    captions = parse_captions(raw.members.get(CAPTION_EXT))
    if captions is None:
        return Damage("bad_caption_json", where, raw.ordinal)
    if not captions:
        return Damage("empty_caption", where, raw.ordinal)
    ids = [np.asarray(tokenizer.encode(c), dtype=np.int64) for c in captions]
    ids = [x for x in ids if 0 < len(x) <= max_tokens]
    if not ids:
        return Damage("caption_too_long", where, raw.ordinal)
    image = raw.members.get(IMAGE_EXT)
    if image is None:
        return Damage("missing_image", where, raw.ordinal)
    try:
        pixels = read_uint8(io.BytesIO(image), image_size, channels=3)  # type: ignore[arg-type]
    except ImageReadError:
        return Damage("unreadable_image", where, raw.ordinal)
    return Record((shard, raw.ordinal), pixels, ids)
