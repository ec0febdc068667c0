"""Rebuild src/transfusion/assets/tokenizer.json: byte-level BPE on Shakespeare (training plays) + captions.

Deterministic: the same corpus in the same order gives the same file. Captions are repeated so that item and
colour words become single tokens even though the captions are a tiny fraction of the corpus; this keeps
caption documents short. Held-out plays (perplexity) are never seen here.

    .venv/bin/python scripts/build_tokenizer.py [--vocab-size 2048] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from transfusion.data import fashion, shakespeare
from transfusion.tokenizer import DEFAULT_PATH, train_tokenizer

CAPTION_REPEATS = 200  # caption words must win merges against Shakespeare's far larger counts


def corpus() -> list[str]:
    captions = [c for i in range(len(fashion.ITEMS)) for k in range(len(fashion.COLOUR_NAMES))
                for c in fashion.all_captions(i, k)]
    return shakespeare.load_texts("train") + captions * CAPTION_REPEATS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = ap.parse_args()
    tok = train_tokenizer(corpus(), vocab_size=args.vocab_size)
    tok.save(args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:16]
    cap = fashion.caption(9, 6, 1)
    print(f"wrote {args.out}: vocab {tok.vocab_size}, sha256 {digest}")
    print(f"{cap!r} -> {[tok.id_to_token(i) for i in tok.encode(cap)]}")


if __name__ == "__main__":
    main()
