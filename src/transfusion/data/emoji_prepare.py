"""Turn the emoji-datasource npm tarballs into one compact prepared file, once (`make data` runs it).

    emoji-datasource-google-16.0.0.tgz   package/img/google/64/*.png (RGBA 64x64) + package/emoji.json
    emoji-datasource-twitter-16.0.0.tgz  package/img/twitter/64/*.png              + package/emoji.json
        -> CACHE/emoji/emoji64.npz: images (N, 64, 64, 3) uint8 composited on white, and one string / int
           array per record attribute (no pickles: numpy's fixed-width unicode arrays load with allow_pickle=False)

A record is one (emoji, style, skin tone) image. PNGs are read straight out of the tarballs (7k small files are
never unpacked onto disk), and training never reads a PNG again. Skipped inputs are counted (SkipStats):
`no_name` (an emoji.json entry without a usable name), `missing_file` (emoji.json names an image the tarball
lacks), `unreadable_image` (a corrupt PNG). Two-tone variants (handshake, couples: 25 per emoji) are left out
on purpose and counted as `two_skin_tones`: one tone attribute cannot describe them.

Background: transparent pixels are composited onto WHITE. The RGB under alpha = 0 is arbitrary, so some fixed
colour is needed; white is how emoji are seen in most light UIs, and it keeps dark emoji (black heart, 8-ball,
black flags) and dark outlines visible; pure-white emoji (white flag, white circle) lose their silhouette
instead, a smaller set.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from transfusion.data.image_text import SkipStats
from transfusion.images import RESAMPLE

STYLES: tuple[str, ...] = ("google", "twitter")
TONES: tuple[str, ...] = ("none", "light", "medium-light", "medium", "medium-dark", "dark")
# Unicode skin-tone modifiers (Fitzpatrick types 1-2 .. 6) -> index into TONES
TONE_CODES: dict[str, int] = {"1F3FB": 1, "1F3FC": 2, "1F3FD": 3, "1F3FE": 4, "1F3FF": 5}
SIZE = 64  # the npm packages' size; 32x32 is derived at load time (emoji.py)
BACKGROUND = 255  # white, see the module docstring
VERSION = "16.0.0"
PREPARED_NAME = "emoji64.npz"
# record attribute arrays stored next to `images`; `toneable`: the emoji has skin-tone variants at all
FIELDS: tuple[str, ...] = ("key", "name", "category", "subcategory", "style", "tone", "toneable", "sort_order")


def tarball_name(style: str) -> str:
    return f"emoji-datasource-{style}-{VERSION}.tgz"


def clean_name(raw: object, subcategory: str = "") -> str:
    """emoji.json's Unicode-style name -> caption words: 'WAVING HAND SIGN' -> 'waving hand',
    'FAMILY: MAN, BOY' -> 'family man boy', 'WHITE UP POINTING INDEX' (a hand) -> 'up pointing index'.

    Commas and colons go because captions use them as separators; a hand's 'white' (the outline glyph of the
    old character sets) goes because it reads as a skin colour next to 'dark skin tone'. '' if nothing is left."""
    if not isinstance(raw, str):
        return ""
    name = raw.lower().replace("&", "and").replace("’", "'")
    name = re.sub(r"[:,()]", " ", name)
    name = " ".join(name.split())
    is_hand = subcategory.startswith("hand") or subcategory == "hands" or "hand" in name or "thumbs" in name
    if is_hand and name.endswith(" sign"):
        name = name[: -len(" sign")]
    if subcategory.startswith("hand") and name.startswith("white "):
        name = name[len("white "):]
    return name


@dataclass
class Variant:
    """One image of an emoji: its skin tone (index into TONES) and the PNG name emoji.json gives."""

    tone: int
    image: str
    unified: str
    flags: dict  # has_img_<style> flags of this variant


def variants(entry: dict, stats: SkipStats) -> Iterator[Variant]:
    """The base image and every one-tone variant of an emoji.json entry (two-tone ones counted, not kept)."""
    yield Variant(0, str(entry.get("image", "")), str(entry.get("unified", "")), entry)
    for code, var in sorted((entry.get("skin_variations") or {}).items()):
        parts = code.split("-")
        if any(p not in TONE_CODES for p in parts) or len(set(parts)) != 1:
            stats.skip("two_skin_tones", f"{entry.get('name')} {code}")
            continue
        yield Variant(TONE_CODES[parts[0]], str(var.get("image", "")), str(var.get("unified", "")), var)


def composite(png: bytes) -> np.ndarray:
    """PNG bytes -> (SIZE, SIZE, 3) uint8 on the white background; raises ValueError if it cannot be decoded.

    RGBA is composited (rgb*a + white*(1-a), straight alpha as PNG stores it) at the file's own size, then
    resized with the project's kernel if the file is not SIZE x SIZE."""
    try:
        with Image.open(io.BytesIO(png)) as im:
            im.load()  # decode now, so a truncated file fails here
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(str(e)) from e
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + BACKGROUND * (1.0 - alpha)
    out = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if out.size != (SIZE, SIZE):
        out = out.resize((SIZE, SIZE), RESAMPLE)
    return np.asarray(out, dtype=np.uint8)


def _png_members(tar: tarfile.TarFile, style: str) -> dict[str, tarfile.TarInfo]:
    prefix = f"package/img/{style}/{SIZE}/"
    return {m.name[len(prefix):]: m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)}


def _read_json(tar: tarfile.TarFile) -> list[dict]:
    f = tar.extractfile("package/emoji.json")
    if f is None:
        raise ValueError("package/emoji.json is not a file")
    entries = json.loads(f.read().decode("utf-8"))
    if not isinstance(entries, list):
        raise ValueError("package/emoji.json is not a list of emoji")
    return [e for e in entries if isinstance(e, dict)]


def entry_names(entries: list[dict]) -> list[str]:
    """The caption name of every entry; entries whose names clean to the same words ('MAN IN TUXEDO' twice:
    the person and the man) use their short names instead ('person in tuxedo', 'man in tuxedo'). '' for an
    entry without a usable name, or one still ambiguous."""
    def short(e: dict) -> str:
        words = str(e.get("short_name", "")).replace("_", " ").replace("-", " ")
        return clean_name(words, str(e.get("subcategory", "")))

    names = [clean_name(e.get("name"), str(e.get("subcategory", ""))) for e in entries]
    seen = Counter(names)
    names = [short(e) if n and seen[n] > 1 else n for n, e in zip(names, entries)]
    seen = Counter(names)
    return [n if n and seen[n] == 1 else "" for n in names]


def read_style(tgz: Path, style: str, stats: SkipStats) -> tuple[list[np.ndarray], list[dict]]:
    """All images of one style's tarball with their records (dicts of FIELDS)."""
    images: list[np.ndarray] = []
    records: list[dict] = []
    with tarfile.open(tgz, "r:gz") as tar:
        entries = _read_json(tar)
        members = _png_members(tar, style)
        entries = sorted(entries, key=lambda e: (int(e.get("sort_order", 0) or 0), str(e.get("unified"))))
        for entry, name in zip(entries, entry_names(entries)):
            if not name:
                stats.skip("no_name", f"{style}/{entry.get('unified')}")
                continue
            toneable = bool(entry.get("skin_variations"))
            for var in variants(entry, stats):
                where = f"{style}/{var.image or var.unified}"
                member = members.get(var.image)
                if not var.flags.get(f"has_img_{style}", True) or member is None:
                    stats.skip("missing_file", where)
                    continue
                try:
                    data = tar.extractfile(member)
                    images.append(composite(data.read() if data else b""))
                except ValueError:
                    stats.skip("unreadable_image", where)
                    continue
                records.append({
                    "key": f"{var.unified}/{style}", "name": name, "category": str(entry.get("category", "")),
                    "subcategory": str(entry.get("subcategory", "")), "style": style, "tone": var.tone,
                    "toneable": toneable, "sort_order": int(entry.get("sort_order", 0) or 0),
                })
    return images, records


def save_prepared(path: Path, images: np.ndarray, records: list[dict]) -> None:
    """images (N, S, S, 3) uint8 + records -> one .npz of plain arrays (written atomically)."""
    arrays: dict[str, np.ndarray] = {"images": np.ascontiguousarray(images, dtype=np.uint8)}
    for f in FIELDS:
        vals = [r[f] for r in records]
        arrays[f] = np.asarray(vals, dtype=np.int16 if f in ("tone", "sort_order") else
                               (np.bool_ if f == "toneable" else str))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def prepare(src_dir: Path, out: Path) -> SkipStats:
    """Both styles' tarballs in `src_dir` -> the prepared file `out`. FileNotFoundError names a missing one."""
    stats = SkipStats()
    all_images: list[np.ndarray] = []
    all_records: list[dict] = []
    for style in STYLES:
        tgz = src_dir / tarball_name(style)
        if not tgz.is_file():
            raise FileNotFoundError(f"{tgz} not found (npm pack emoji-datasource-{style}@{VERSION})")
        images, records = read_style(tgz, style, stats)
        all_images += images
        all_records += records
    if not all_records:
        raise ValueError(f"no usable emoji in {src_dir}: {stats.summary()}")
    stats.used = len(all_records)
    save_prepared(out, np.stack(all_images), all_records)
    return stats
