"""`make data` (emoji part): fetch the emoji npm packages and prepare them once for training.

    .venv/bin/python scripts/get_emoji.py [--force]

1. `npm pack emoji-datasource-google@16.0.0` and `...-twitter@16.0.0` into CACHE/emoji/ (CACHE: env.cache_dir(),
   $TRANSFUSION_CACHE or ~/.cache/transfusion); ~135 MB of tarballs, skipped when already there.
2. Convert both into CACHE/emoji/emoji64.npz (data/emoji_prepare.py: 7,052 RGB 64x64 images on white + their
   attributes, ~17 MB; ~2 min on 2 cores), skipped when already there unless --force.

Never fails: without npm or the registry it says so, and training uses the committed subset
src/transfusion/assets/emoji_subset.npz (data/emoji.py warns once). The images are fetched rather than
committed because of their size and their licences (assets/NOTICE.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from transfusion.data.emoji_prepare import PREPARED_NAME, STYLES, VERSION, prepare, tarball_name
from transfusion.env import cache_dir

FALLBACK = ("data: emoji -> FALLBACK to the committed subset src/transfusion/assets/emoji_subset.npz; "
            "rerun `make data` with npm and the npm registry reachable for all 7,052 images")


def npm_pack(style: str, dest: Path) -> str | None:
    """Download one package's tarball into `dest`; None on success, else why not."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed (Debian: apt-get install npm; or nodejs.org)"
    spec = f"emoji-datasource-{style}@{VERSION}"
    print(f"data: npm pack {spec} -> {dest} ...", flush=True)
    try:
        res = subprocess.run([npm, "pack", spec, "--pack-destination", str(dest), "--silent"],
                             capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return f"npm pack {spec} timed out (network?)"
    if res.returncode != 0 or not (dest / tarball_name(style)).is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return f"npm pack {spec} failed (no network or registry?): {' / '.join(tail)}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="re-prepare even if the prepared file exists")
    args = ap.parse_args()
    dest = cache_dir() / "emoji"
    out = dest / PREPARED_NAME
    if out.is_file() and not args.force:
        print(f"data: emoji already prepared at {out}")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    for style in STYLES:
        if not (dest / tarball_name(style)).is_file():
            why = npm_pack(style, dest)
            if why:
                print(f"data: cannot fetch the emoji images: {why}")
                print(FALLBACK)
                return 0
    print(f"data: preparing {out} from the two tarballs (~2 min) ...", flush=True)
    try:
        stats = prepare(dest, out)
    except (OSError, ValueError) as e:
        print(f"data: preparing the emoji data failed: {e}")
        print(FALLBACK)
        return 0
    print(f"data: emoji ready at {out}; {stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
