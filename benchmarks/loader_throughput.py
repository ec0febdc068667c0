"""Is the shard loader the bottleneck? Its records/s and batches/s against the trainer's consumption at the tiny
config (configs/tiny.toml: 28x28 RGB, batch 32 rows of 128, text_ratio 0.25), one thread.

    python benchmarks/loader_throughput.py [--records 2000] [--runs 3] [--steps 6] [--out results/loader.json]

1. A synthetic user folder: `--records` random images of odd sizes (24..96 px, centre-cropped and resized to
   28 by `transfusion shard`), two captions each; sharded in 250-record shards.
2. Loader alone: ShardLoader (one rank, one stream slot, buffer 1000) makes `--batches` batches; median of
   `--runs` runs. The first batch fills the shuffle buffer and is timed separately (`first_batch_s`).
3. Trainer: `train()` at the tiny config for `--steps` steps on the same shards; the median step time
   (metrics.jsonl's train_s, which includes fetching the batch) gives steps/s and records/s consumed.
The ratio loader/trainer says how much headroom the loader has; > 1 means it is not the bottleneck.
Numbers from a shared 2-core machine are noisy: the JSON records the thread count and a note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from transfusion import config
from transfusion.data.shards_loader import ShardLoader
from transfusion.data.shards_writer import ShardOptions, write_shards
from transfusion.metrics import read_metrics
from transfusion.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


def make_folder(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(24, 97, size=2))
        base = rng.integers(0, 256, (1, 1, 3))  # a coloured field with noise: PNG-compressible like a photo
        img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": [f"a picture number {i}", f"photo {i % 97}"]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def overrides(shards: Path) -> list[str]:
    return ['data.dataset="shards"', f'data.folder="{shards}"', "runtime.threads=1", "train.tensorboard=false",
            "train.sample_n=0", "train.ckpt_every=0", "train.time_limit_min=0", "train.log_every=1"]


def loader_rate(cfg: config.Config, tok: Tokenizer, batches: int) -> dict:
    t0 = time.perf_counter()
    loader = ShardLoader(cfg, tok)
    next(loader)  # fills the shuffle buffer
    first = time.perf_counter() - t0
    records, t1 = 0, time.perf_counter()
    for _ in range(batches):
        next(loader)
        records += len(loader.last_keys)
    dt = time.perf_counter() - t1
    return {"batches_per_s": batches / dt, "records_per_s": records / dt, "first_batch_s": first,
            "records_per_batch": records / batches}


def trainer_rate(cfg: config.Config, out: Path) -> dict:
    from transfusion.train import train

    summary = train(cfg, out, progress=False)
    recs = read_metrics(out / "metrics.jsonl")
    step_s = [b["train_s"] - a["train_s"] for a, b in zip(recs, recs[1:])]  # first step (warm-up) left out
    med = statistics.median(step_s)
    used = summary.get("data", {}).get("used", 0)
    return {"steps_per_s": 1 / med, "records_per_s": used / cfg.train.steps / med, "median_step_s": med,
            "tokens_per_s": recs[-1]["tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tok = Tokenizer.load()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "src", args.records)
        t0 = time.perf_counter()
        report = write_shards(tmp / "src", tmp / "shards", ShardOptions(image_size=28, shard_size=250), tok)
        shard_s = time.perf_counter() - t0
        base = config.load(TINY, overrides(tmp / "shards"))
        runs = [loader_rate(base, tok, args.batches) for _ in range(args.runs)]
        trainer = trainer_rate(config.load(TINY, overrides(tmp / "shards") + [f"train.steps={args.steps}"]),
                               tmp / "run")
    loader = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {
        "what": "shard loader vs trainer consumption, tiny config (configs/tiny.toml), 1 thread",
        "note": "measured once on a shared 2-core CPU machine (other jobs running): order of magnitude only",
        "python": sys.version.split()[0], "machine": platform.machine(), "threads": 1,
        "shard": {"records": report["used"], "seconds": round(shard_s, 2), "records_per_s": report["used"] / shard_s},
        "loader": loader, "loader_runs": runs, "trainer": trainer,
        "loader_over_trainer_records": loader["records_per_s"] / max(1e-9, trainer["records_per_s"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("shard", "loader", "trainer", "loader_over_trainer_records")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
