"""Sharded, streamed image-caption data (data/shards_*.py): `transfusion shard` with its skip report, the
stream's split over ranks and workers, exact same-world-size resume, re-split on another world size without
repeating or dropping records, and damaged shards (truncated, a corrupt record, a corrupt header, fuzzed bytes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transfusion import config
from transfusion.checkpoint import layout as ck
from transfusion.cli import main as cli_main
from transfusion.data.image_text import SkipStats
from transfusion.data.shards_loader import ShardLoader
from transfusion.data.shards_reader import (
    INDEX_FILE, REPORT_FILE, Damage, RawRecord, Record, ShardError, decode, iter_raw, load_index,
)
from transfusion.data.shards_stream import RankStream, ShardSource
from transfusion.data.shards_writer import ShardOptions, write_shards
from transfusion.metrics import read_metrics
from transfusion.tokenizer import Tokenizer
from transfusion.train import train

from train_helpers import write_micro_config


@functools.lru_cache(maxsize=1)
def tok() -> Tokenizer:
    return Tokenizer.load()


def make_folder(root: Path, n: int = 40, seed: int = 0) -> Path:
    """n images of odd sizes (1-px strips included), two captions each, plus a corrupt file, a missing file,
    an empty caption, an over-long caption and a line that is not JSON."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        h, w = (1, 37) if i == 0 else (int(rng.integers(3, 41)), int(rng.integers(3, 41)))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": [f"picture {i}", f"photo number {i}"]}))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9)
    lines += [json.dumps({"image": "corrupt.png", "caption": "broken"}),
              json.dumps({"image": "absent.png", "caption": "missing"}),
              json.dumps({"image": "1.png", "caption": "  "}),
              json.dumps({"image": "1.png", "caption": "word " * 100}),
              "not json"]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@functools.lru_cache(maxsize=4)
def _shards(base: str, shard_size: int, val_fraction: float) -> Path:
    out = Path(base) / f"shards-{shard_size}-{val_fraction}"
    write_shards(make_folder(Path(base) / "src"), out, ShardOptions(image_size=8, shard_size=shard_size,
                                                                     val_fraction=val_fraction), tok())
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 good records in train shards of 3 (odd sizes on purpose), no val split."""
    return _shards(str(tmp_path_factory.mktemp("shards")), 3, 0.0)


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def source(root: Path, split: str = "train") -> ShardSource:
    return ShardSource(load_index(root), split, tok(), 64)


def all_keys(root: Path) -> list[tuple[int, int]]:
    index = load_index(root)
    return [(s, o) for s, info in enumerate(index.shards("train")) for o in range(info.records)]


# ------------------------------------------------------------------------------------------ writing


def test_shard_verb_skips_and_reports(tmp_path, capsys) -> None:
    src = make_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert cli_main(["shard", str(src), "--out", str(out), "--image-size", "8", "--shard-size", "7",
                     "--val-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "40 examples used, 5 skipped" in printed
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["skipped"] == {"unreadable_image": 1, "missing_file": 1, "empty_caption": 1,
                                 "caption_too_long": 1, "bad_line": 1}
    index = load_index(out)
    assert index.records("train") + index.records("val") == 40 and 0 < index.records("val") < 20
    meta = json.loads((out / INDEX_FILE).read_text())
    for info in meta["splits"]["train"] + meta["splits"]["val"]:  # counts, sizes and checksums are the files'
        data = (out / info["name"]).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"]
        with tarfile.open(out / info["name"]) as tar:  # a plain tar: any reader (or webdataset) reads it
            names = tar.getnames()
        assert len(names) == 2 * info["records"] and names[0].endswith(".png") and names[1].endswith(".json")
    rec = next(r for r in source(out).records(0) if isinstance(r, Record))
    assert rec.pixels.shape == (3, 8, 8) and len(rec.captions) == 2  # every caption kept
    assert not list(out.glob(".*tmp"))
    # the same input again: refused, one error line, exit 2
    assert cli_main(["shard", str(src), "--out", str(out)]) == 2
    assert cli_main(["shard", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2


def test_jsonl_source_with_caption_lists(tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    for i, size in enumerate([(5, 9), (30, 7)]):
        Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.jpg")
    (tmp_path / "pairs.jsonl").write_text("\n".join([
        json.dumps({"image": "imgs/0.jpg", "caption": ["one", "", "uno"]}),
        json.dumps({"image": "imgs/1.jpg", "captions": "two"}),
        json.dumps({"image": "imgs/1.jpg", "caption": []}),
        json.dumps({"caption": "no image"})]))
    report = write_shards(tmp_path / "pairs.jsonl", tmp_path / "out", ShardOptions(image_size=4), tok())
    assert report["records"] == {"train": 2, "val": 0} and report["skipped"] == {"empty_caption": 1, "bad_line": 1}
    recs = [r for r in source(tmp_path / "out").records(0) if isinstance(r, Record)]
    assert [[tok().decode(c.tolist()) for c in r.captions] for r in recs] == [["one", "uno"], ["two"]]


def test_val_split_is_stable_and_loads_as_test(tmp_path) -> None:
    a = _shards(str(tmp_path), 7, 0.25)
    b = write_shards(tmp_path / "src", tmp_path / "again", ShardOptions(image_size=8, shard_size=5,
                                                                          val_fraction=0.25), tok())
    assert b["records"]["val"] == load_index(a).records("val")  # a hash of the path, not the shard size
    from transfusion.data.registry import get_dataset

    cfg = config.load(None, ['data.dataset="shards"', f'data.folder="{a}"'])
    images, stats = get_dataset(cfg.data).image_set(tok(), "test", 8, 3)
    assert len(images) == stats.used == load_index(a).records("val")
    assert get_dataset(cfg.data).sample_prompts(2)[0].startswith("picture")


# ------------------------------------------------------------------------------------------ streaming


def test_stream_reads_every_record_once_per_epoch(shards) -> None:
    stream = RankStream(source(shards), seed=0, rank=0, world_size=1, workers=1, buffer=5)
    keys = all_keys(shards)
    first = [stream.next().key for _ in range(len(keys))]
    assert sorted(first) == keys and first != keys  # all of them, shuffled
    second = [stream.next().key for _ in range(len(keys))]
    assert sorted(second) == keys and second != first  # the next epoch, in another order


def test_ranks_and_workers_never_overlap(shards) -> None:
    keys = all_keys(shards)
    streams = [RankStream(source(shards), 0, rank, 2, 2, buffer=4) for rank in range(2)]
    slots = [s for r in streams for s in r.slots]
    shard_sets = [set(q[0] for q in s.state.queue) for s in slots]
    assert sorted(i for s in shard_sets for i in s) == list(range(len(load_index(shards).shards("train"))))
    got = []
    for slot in slots:  # each (rank, worker) slot's epoch 0
        while slot.state.queue or slot.buffer:
            got.append(slot.next().key)
        assert {k[0] for k in got[-3:]} <= shard_sets[slots.index(slot)]
    assert sorted(got) == keys  # disjoint, and together everything


def test_fewer_shards_than_streams_is_an_error(shards) -> None:
    with pytest.raises(ShardError, match="cannot feed"):
        RankStream(source(shards), 0, 0, 4, 4, buffer=4)


def _loader(root: Path, rank: int = 0, world: int = 1, *over: str) -> ShardLoader:
    cfg = config.load(None, ['model.preset="micro"', 'data.dataset="shards"', f'data.folder="{root}"',
                             "data.seq_len=128", "train.batch_size=6", "data.shuffle_buffer=4",
                             "data.text_ratio=0", *over])
    return ShardLoader(cfg, tok(), rank=rank, world_size=world)


def test_same_world_size_resume_gives_identical_batches(shards) -> None:
    a = _loader(shards, 0, 1, "data.loader_workers=2", "data.text_ratio=0.3")
    for _ in range(4):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # through JSON, as in train_state.json
    b = _loader(shards, 0, 1, "data.loader_workers=2", "data.text_ratio=0.3")
    b.load_state_dict(state)
    for _ in range(6):  # across an epoch boundary (40 records, ~5 per batch)
        x, y = next(a), next(b)
        assert a.last_keys == b.last_keys
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.patches, y.patches)


@pytest.mark.parametrize("new_world", [1, 3])
def test_other_world_size_resume_repeats_and_drops_nothing(shards, new_world) -> None:
    old = [_loader(shards, r, 2) for r in range(2)]
    used = []
    for ld, steps in zip(old, (2, 1)):  # ranks reach different epochs (records per step vary in real runs)
        for _ in range(steps):
            next(ld)
            used += ld.last_keys
    state = {**old[0].state_dict(), "ranks": [ld.stream.state_dict() for ld in old]}  # what gather_json makes
    state = json.loads(json.dumps(state))
    last = max(s["epoch"] for r in state["ranks"] for s in r["slots"])
    assert last == 1 and min(s["epoch"] for r in state["ranks"] for s in r["slots"]) == 0  # ranks in 2 epochs
    rest = []
    for r in range(new_world):
        ld = _loader(shards, r, new_world)
        ld.load_state_dict(state)
        for slot in ld.stream.slots:  # drain what is left of the epoch(s) the old run had entered
            while slot.state.queue or slot.buffer:
                rest.append(slot.next().key)
    assert sorted(used + rest) == sorted(all_keys(shards) * 2)  # each record of epochs 0 and 1 exactly once


def test_exact_resume_of_a_training_run(tmp_path, shards) -> None:
    """An uninterrupted 6-step run vs the same run resumed from its step-3 checkpoint: identical losses."""
    extra = "keep_checkpoints = 0"
    cfg_path = write_micro_config(tmp_path / "c.toml", steps=6, ckpt_every=3, extra=extra)
    over = ['data.dataset="shards"', f'data.folder="{shards}"', "data.shuffle_buffer=4", "train.tensorboard=false"]
    ref = tmp_path / "ref"
    summary = train(config.load(cfg_path, over), ref, progress=False)
    assert summary["data"]["used"] >= 0
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "checkpoints" / ck.step_name(6))
    ck.write_latest(resumed / "checkpoints", ck.step_name(3))
    train(config.load(cfg_path, over), resumed, resume=True, progress=False)
    a = {r["step"]: r["loss"] for r in read_metrics(ref / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)


# ------------------------------------------------------------------------------------------ damage


def _read_all(path: Path) -> tuple[list[int], SkipStats]:
    stats, ords = SkipStats(), []
    src = ShardSource(load_index(path.parent), "train", tok(), 64)
    shard = [i.name for i in src.index.shards("train")].index(path.name)
    for rec in src.records(shard):
        if isinstance(rec, Damage):
            stats.skip(rec.reason, rec.where)
        else:
            ords.append(rec.key[1])
    return ords, stats


def _offsets(path: Path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def test_truncated_shard_keeps_what_precedes_the_cut(tmp_path, shards) -> None:
    root = copy_shards(_shards(str(tmp_path), 10, 0.0), tmp_path / "cut")
    path = root / load_index(root).shards("train")[0].name
    cut = _offsets(path)["000006.png"] + 700  # inside record 6's image
    path.write_bytes(path.read_bytes()[:cut])
    ords, stats = _read_all(path)
    assert ords == [0, 1, 2, 3, 4, 5] and stats.counts["truncated_shard"] == 1


def test_corrupt_record_mid_shard_is_skipped_and_the_rest_read(tmp_path) -> None:
    root = copy_shards(_shards(str(tmp_path), 10, 0.0), tmp_path / "bad")
    path = root / load_index(root).shards("train")[0].name
    data = bytearray(path.read_bytes())
    at = _offsets(path)
    png = at["000003.png"] + 512 + 20  # inside record 3's PNG data: the image no longer decodes
    data[png:png + 40] = b"\x00" * 40
    data[at["000006.png"] + 10] ^= 0xFF  # record 6's image header: checksum fails, the reader resynchronises
    path.write_bytes(bytes(data))
    ords, stats = _read_all(path)
    assert ords == [0, 1, 2, 4, 5, 7, 8, 9]
    assert stats.counts["unreadable_image"] == 1 and stats.counts["corrupt_header"] == 1
    assert stats.counts["missing_image"] == 1  # record 6's caption survived without its image
    # the stream counts them too, and goes on
    stream = RankStream(source(root), 0, 0, 1, 1, buffer=3)
    keys = [stream.next().key for _ in range(load_index(root).records("train") - 2)]
    assert len(set(keys)) == len(keys) and (0, 3) not in keys and stream.stats.counts["unreadable_image"] == 1


def test_missing_index_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ShardError, match="transfusion shard"):
        load_index(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ShardError, match="unreadable"):
        load_index(tmp_path)


def fuzz(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@fuzz(60)
@given(data=st.data())
def test_fuzzed_shards_never_crash_the_reader(tmp_path_factory, data) -> None:
    """Truncated, bit-flipped, spliced or random bytes: the reader yields records or Damage, never raises."""
    base = _shards(str(tmp_path_factory.getbasetemp() / "fuzz"), 10, 0.0)
    good = (base / load_index(base).shards("train")[0].name).read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    if kind == "truncate":
        blob = good[:data.draw(st.integers(0, len(good)))]
    elif kind == "flip":
        blob = bytearray(good)
        for at in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=20)):
            blob[at] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif kind == "splice":
        at = data.draw(st.integers(0, len(good)))
        blob = good[:at] + data.draw(st.binary(max_size=2000)) + good[at:]
    else:
        blob = data.draw(st.binary(max_size=3000))
    path = tmp_path_factory.getbasetemp() / "fuzz" / "one.tar"
    path.write_bytes(blob)
    for item in iter_raw(path):
        assert isinstance(item, (Damage, RawRecord))
        if isinstance(item, RawRecord):
            assert isinstance(decode(item, 0, 8, tok(), 64), (Record, Damage))


def test_two_rank_run_resumes_on_one_process(tmp_path, shards) -> None:
    """`transfusion train` on 2 torchrun ranks gathers both ranks' stream positions into its checkpoint; one
    plain process resumes from it (re-split) and finishes."""
    import os
    import socket
    import subprocess
    import sys

    cfg = write_micro_config(tmp_path / "c.toml", steps=4, ckpt_every=2, extra="keep_checkpoints = 0")
    sets = ["--set", 'data.dataset="shards"', "--set", f'data.folder="{shards}"', "--set", "data.shuffle_buffer=4",
            "--set", "train.tensorboard=false", "--no-progress"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "transfusion.cli", "train", str(cfg),
                    "--out", str(two), *sets], check=True, env=env, capture_output=True, timeout=240)
    one = tmp_path / "one"
    shutil.copytree(two, one)
    shutil.rmtree(one / "checkpoints" / ck.step_name(4))
    ck.write_latest(one / "checkpoints", ck.step_name(2))
    state = json.loads((one / "checkpoints" / ck.step_name(2) / "train_state.json").read_text())
    ranks = state["train_state"]["loader"]["ranks"]
    assert [[s["slot"] for s in r["slots"]] for r in ranks] == [[0], [1]]
    done = subprocess.run([sys.executable, "-m", "transfusion.cli", "train", str(cfg), "--out", str(one), "--resume",
                           *sets], check=True, env=env, capture_output=True, text=True, timeout=240)
    assert "examples used" in done.stdout + done.stderr
    assert sorted(r["step"] for r in read_metrics(one / "metrics.jsonl")) == [1, 2, 3, 4]


def test_eval_scores_a_model_trained_on_shards(tmp_path) -> None:
    """`transfusion eval` on a shards checkpoint: FID reference, image-text scorer and captions come from the
    validation shards (the dataset-driven suite), with nothing skipped for want of data."""
    from test_eval_dataset import tiny_eval


    src = _shards(str(tmp_path), 4, 0.25)
    cfg_path = write_micro_config(tmp_path / "c.toml", steps=2, ckpt_every=2)
    over = ['data.dataset="shards"', f'data.folder="{src}"', "data.shuffle_buffer=4", "train.tensorboard=false"]
    train(config.load(cfg_path, over), tmp_path / "run", progress=False)
    report = tiny_eval(tmp_path / "run", tmp_path)
    assert report["dataset"] == "shards" and report["clip_score"] is not None and report["n_captions"] == 2
    assert report["n_real"] == 4
