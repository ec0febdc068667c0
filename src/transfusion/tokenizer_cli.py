"""`transfusion tokenizer CORPUS... --out tokenizer.json --vocab-size N`: a byte-level BPE for a user's text.

The corpus is read exactly as `data.text_files` reads it (data/text_files.py: text files, JSONL of {"text": ...},
folders of them; bad lines skipped and counted), and the held-out tail of each file (`--heldout`, by default
`data.text_heldout`'s default) is left out, so the text that perplexity is measured on never shaped the
vocabulary, as scripts/build_tokenizer.py leaves out Shakespeare's held-out plays. The special tokens are the
project's (tokenizer.SPECIAL_TOKENS, ids 0-4), so the file works wherever `data.tokenizer = PATH` is read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from transfusion.config import DataConfig
from transfusion.log import log


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from transfusion.data.text_files import read_split, summary  # lazily: `transfusion --help` stays fast
    from transfusion.tokenizer import train_tokenizer

    part = read_split(list(args.corpus), args.heldout, "train", what="tokenizer corpus")
    if part.stats.total:
        log.warning(f"tokenizer corpus: {summary(part.stats)}")
    tok = train_tokenizer(part.texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:  # a killed or failed write never leaves half a tokenizer.json under the real name
        tok.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    chars = sum(len(t) for t in part.texts)
    print(f"wrote {out}: vocab {tok.vocab_size} (asked {args.vocab_size}), sha256 {digest}, trained on "
          f"{len(part.texts)} documents ({chars:,} characters)")
    print(f"use it: --set data.tokenizer='\"{out}\"' --set model.vocab_size={max(tok.vocab_size, 1)}")
    return 0


def add_verb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text files / JSONL")
    p.add_argument("corpus", nargs="+", help="text files, JSONL ({\"text\": ...} per line) or folders of them")
    p.add_argument("--out", required=True, help="tokenizer.json to write (then data.tokenizer = PATH)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokens including the 5 specials and 256 bytes")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair is merged only if seen this often")
    p.add_argument("--heldout", type=float, default=DataConfig.text_heldout,
                   help="tail of each file left out (the test split of data.text_files)")
    p.set_defaults(func=cmd_tokenizer)
