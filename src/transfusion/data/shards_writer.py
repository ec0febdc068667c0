"""`transfusion shard`: a user's image-caption data -> tar shards + index.json + report.json (format in
shards_reader.py, reasons in docs/data.md).

Input is either a folder (DIR/captions.jsonl + images, as data/folder.py reads it) or any JSONL file whose
lines are {"image": path, "caption": str | [str, ...]} (also "captions"), paths relative to the JSONL's folder.
Each image is decoded, centre-cropped and resized once, here (images.read_uint8: the project's one rule), and
stored as a PNG, so training never pays for it again. Bad records are skipped and counted by reason: bad JSON
line, missing or unreadable image, no caption, every caption over-long.

A record goes to the validation split when a hash of its image name (as the JSONL writes it) falls under
`val_fraction`: stable under
reordering and re-running, so adding data never moves an old record between splits.

Outputs are never half-written: each shard is written under a temporary name and renamed when complete, and
index.json (shard names, record counts, sizes, SHA-256) is written last, atomically; a reader takes a
directory without index.json for an unfinished one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

from transfusion.data.folder import CAPTIONS_FILE
from transfusion.data.image_text import SkipStats
from transfusion.data.shards_reader import (
    CAPTION_EXT, FORMAT, IMAGE_EXT, INDEX_FILE, REPORT_FILE, SPLITS, ShardError,
)
from transfusion.images import ImageReadError, read_uint8


@dataclass
class ShardOptions:
    image_size: int = 64
    shard_size: int = 1000  # records per shard; a training run needs >= world_size * workers train shards
    val_fraction: float = 0.0
    max_caption_tokens: int = 64
    tokenizer: str = ""  # tokenizer.json that measures caption length; "" -> the shipped one


@dataclass
class Source:
    where: str  # "captions.jsonl:12", for the report
    image: Path
    captions: list[str]
    name: str  # the image as the JSONL names it: what the val split hashes (independent of where SRC is)


def _captions(entry: dict) -> list[str] | None:
    cap = entry.get("caption", entry.get("captions"))
    if isinstance(cap, str):
        cap = [cap]
    if not isinstance(cap, list):
        return None
    return [c.strip() for c in cap if isinstance(c, str) and c.strip()]


def iter_sources(src: Path, stats: SkipStats) -> Iterator[Source]:
    """The entries of a folder's captions.jsonl or of a JSONL file; unparsable lines are counted."""
    index = src / CAPTIONS_FILE if src.is_dir() else src
    if not index.is_file():
        raise ShardError(f"{index} not found: give a folder with {CAPTIONS_FILE} or a JSONL file of "
                         '{"image": "cat.png", "caption": "a cat"} lines')
    base = index.parent
    with open(index, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{index.name}:{n}"
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                stats.skip("bad_line", where)
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                stats.skip("bad_line", where)
                continue
            caps = _captions(entry)
            if not caps:
                stats.skip("empty_caption", where)
                continue
            yield Source(where, base / entry["image"], caps, entry["image"])


def is_val(name: str, val_fraction: float) -> bool:
    """Stable split: a hash of the image's name in the JSONL, not the record's position."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h / 2**64 < val_fraction


# ------------------------------------------------------------------------------------------ tar output


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SplitWriter:
    """Writes one split's records into `{split}-NNNNNN.tar` shards of `shard_size` records."""

    out: Path
    split: str
    shard_size: int
    shards: list[dict] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _count: int = 0

    def _tmp(self) -> Path:
        return self.out / f".{self.split}-{len(self.shards):06d}.tar.tmp"

    def add(self, pixels, captions: list[str]) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self._tmp(), "w", format=tarfile.USTAR_FORMAT)
        key = f"{self._count:06d}"
        _add(self._tar, f"{key}.{IMAGE_EXT}", _png(pixels))
        _add(self._tar, f"{key}.{CAPTION_EXT}", json.dumps({"captions": captions}, ensure_ascii=False).encode())
        self._count += 1
        if self._count == self.shard_size:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        tmp, final = self._tmp(), self.out / f"{self.split}-{len(self.shards):06d}.tar"
        os.replace(tmp, final)
        self.shards.append({"name": final.name, "records": self._count, "bytes": final.stat().st_size,
                            "sha256": _sha256(final)})
        self._tar, self._count = None, 0


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_options(opts: ShardOptions) -> None:
    if opts.image_size < 1 or opts.shard_size < 1 or opts.max_caption_tokens < 1:
        raise ShardError("--image-size, --shard-size and --max-caption-tokens must be >= 1")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ShardError(f"--val-fraction={opts.val_fraction}: expected a fraction in [0, 1)")


def write_shards(src: str | Path, out: str | Path, opts: ShardOptions, tokenizer=None) -> dict:
    """Shard `src` into `out`; returns the report (also written to out/report.json). ShardError when `src` is
    unusable or `out` already holds shards."""
    from transfusion.tokenizer import Tokenizer

    _check_options(opts)
    src, out = Path(src), Path(out)
    if (out / INDEX_FILE).exists():
        raise ShardError(f"{out} already holds shards ({INDEX_FILE}); pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or Tokenizer.load(opts.tokenizer or None)
    stats, captions_dropped = SkipStats(), 0
    writers = {s: SplitWriter(out, s, opts.shard_size) for s in SPLITS}
    for source in iter_sources(src, stats):
        kept = [c for c in source.captions if len(tokenizer.encode(c)) <= opts.max_caption_tokens]
        captions_dropped += len(source.captions) - len(kept)
        if not kept:
            stats.skip("caption_too_long", f"{source.where} (> {opts.max_caption_tokens} tokens)")
            continue
        if not source.image.is_file():
            stats.skip("missing_file", f"{source.where} ({source.image.name})")
            continue
        try:
            pixels = read_uint8(source.image, opts.image_size, channels=3)
        except ImageReadError:
            stats.skip("unreadable_image", f"{source.where} ({source.image.name})")
            continue
        writers["val" if is_val(source.name, opts.val_fraction) else "train"].add(pixels, kept)
        stats.used += 1
    for w in writers.values():
        w.close()
    if not stats.used:
        raise ShardError(f"no usable image-caption pair in {src}; {stats.summary()}")
    report = {"source": str(src), "used": stats.used, "skipped": dict(stats.counts),
              "skipped_examples": stats.examples, "captions_dropped_too_long": captions_dropped,
              "records": {s: sum(d["records"] for d in w.shards) for s, w in writers.items()},
              "summary": stats.summary()}
    _write_json(out / REPORT_FILE, report)
    index = {"format": FORMAT, "image_size": opts.image_size, "shard_size": opts.shard_size,
             "val_fraction": opts.val_fraction, "max_caption_tokens": opts.max_caption_tokens,
             "splits": {s: w.shards for s, w in writers.items()}}
    _write_json(out / INDEX_FILE, index)  # last: its presence means every shard above is complete
    return report
