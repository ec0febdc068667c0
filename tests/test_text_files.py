"""`data.text_files`: a user's text files / JSONL as the text-only documents, with a held-out tail per file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from transfusion import config
from transfusion.data.loader import build_loader
from transfusion.data.text_files import TextFilesError, heldout_count, read_split, text_corpus, text_files_corpus
from transfusion.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRANSFUSION_CACHE", str(tmp_path / "cache"))


def _files(root: Path) -> tuple[Path, Path]:
    txt = root / "poem.txt"
    txt.write_bytes(b"".join(f"line {i} of the poem\r\n".encode() for i in range(20)) + b"bad \xff byte\n")
    jsonl = root / "docs.jsonl"
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(10)]
    lines[3] = "not json {"
    lines[5] = json.dumps({"body": "no text key"})
    lines[7] = json.dumps({"text": "   "})
    lines.insert(8, "")  # blank lines are not documents and not errors
    jsonl.write_text("\n".join(lines) + "\n")
    return txt, jsonl


def test_splits_are_the_tail_of_each_file_and_bad_lines_are_counted(tmp_path) -> None:
    txt, jsonl = _files(tmp_path)
    train = read_split([str(txt), str(jsonl)], 0.1, "train")
    test = read_split([str(txt), str(jsonl)], 0.1, "test")
    # the text file: 20 UTF-8 lines (the line with a bad byte is skipped) -> ceil(2.0) = 2 held out
    assert train.texts[0] == "".join(f"line {i} of the poem\n" for i in range(18))
    assert test.texts[0] == "line 18 of the poem\nline 19 of the poem\n"
    # the JSONL: 7 good documents (0 1 2 4 6 8 9) -> ceil(0.7) = 1 held out: the last
    assert train.texts[1:] == [f"document number {i}" for i in (0, 1, 2, 4, 6, 8)]
    assert test.texts[1:] == ["document number 9"]
    assert dict(train.stats.counts) == {"not_utf8": 1, "bad_line": 1, "no_text": 1, "empty_text": 1}
    assert train.stats.used == 7 and test.stats.used == 2
    assert "poem.txt:21" in train.stats.examples["not_utf8"] and "docs.jsonl:4" in train.stats.examples["bad_line"]


def test_heldout_count_rule() -> None:
    assert [heldout_count(n, 0.05) for n in (0, 1, 2, 20, 21, 100)] == [0, 0, 1, 1, 2, 5]
    assert heldout_count(10, 0.0) == 0 and heldout_count(3, 0.99) == 2  # the train split keeps >= 1


def test_folders_expand_and_errors_are_clear(tmp_path) -> None:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee\nline two\n")
    (d / "sub" / "a.md").write_text("ay\n")
    (d / "skip.bin").write_bytes(b"\0\1")
    assert read_split([str(d)], 0.0, "train").texts == ["bee\nline two\n", "ay\n"]  # sorted paths: b.txt < sub/
    with pytest.raises(TextFilesError, match="missing.txt not found"):
        read_split([str(tmp_path / "missing.txt")], 0.05, "train")
    with pytest.raises(TextFilesError, match="no .txt/.md/.jsonl files"):
        read_split([str(_empty_dir(tmp_path))], 0.05, "train")
    with pytest.raises(TextFilesError, match="no test text"):
        read_split([str(d / "sub" / "a.md")], 0.05, "test")  # one line: train only
    with pytest.raises(TextFilesError, match=r"\[0, 1\)"):
        read_split([str(d)], 1.5, "train")


def _empty_dir(root: Path) -> Path:
    e = root / "empty"
    e.mkdir()
    return e


def test_corpus_is_cached_and_follows_edits(tmp_path, tok) -> None:
    txt, _ = _files(tmp_path)
    a = text_files_corpus(tok, [str(txt)], 0.1, "train")
    assert len(list((tmp_path / "cache").glob("corpus-*.npz"))) == 1
    b = text_files_corpus(tok, [str(txt)], 0.1, "train")
    np.testing.assert_array_equal(a.ids, b.ids)
    assert tok.decode(a.ids.tolist()).startswith("line 0 of the poem\nline 1")
    txt.write_text("a different poem\nwith two lines\nand a third\n")
    c = text_files_corpus(tok, [str(txt)], 0.1, "train")
    assert tok.decode(c.ids.tolist()) == "a different poem\nwith two lines\n"
    assert len(list((tmp_path / "cache").glob("corpus-*.npz"))) == 2


def test_config_and_loader_use_the_files(tmp_path, tok) -> None:
    txt, jsonl = _files(tmp_path)
    quoted = json.dumps([str(txt), str(jsonl)])  # a TOML array of strings
    cfg = config.load(None, [f"data.text_files={quoted}", "data.text_heldout=0.1", "data.text_ratio=1.0",
                             "train.batch_size=2", "data.seq_len=32"])
    assert cfg.data.text_files == [str(txt), str(jsonl)]
    back = config.from_dict(__import__("tomllib").loads(config.dump_toml(cfg)))  # saved config round-trips
    assert back.data.text_files == cfg.data.text_files and back.data.text_heldout == 0.1
    assert config.load(None, ["data.text_files=notes.txt"]).data.text_files == ["notes.txt"]
    with pytest.raises(config.ConfigError, match="list of strings"):
        config.load(None, ["data.text_files=[1, 2]"])
    assert config.load(None).data.text_files == []  # default: Shakespeare
    test_text = tok.decode(text_corpus(cfg.data, tok, "test").ids.tolist())
    assert "line 19 of the poem" in test_text and "document number 9" in test_text
    batch = next(build_loader(cfg, tok, split="train"))
    batch.validate(cfg.model.patch_dim, cfg.model.patches_per_image, cfg.model.vocab_size)
    seen = tok.decode([i for i in batch.tokens.flatten().tolist() if i not in tok.special_ids])
    assert ("poem" in seen or "document" in seen) and "line 19" not in seen and "number 9" not in seen


def test_cli_reports_a_missing_text_file(tmp_path, capsys) -> None:
    from transfusion.cli import main

    rc = main(["prepare", "--set", f'data.text_files=["{tmp_path / "gone.txt"}"]'])
    assert rc == 0  # prepare does not read the text; training does:
    cfg = config.load(None, [f'data.text_files=["{tmp_path / "gone.txt"}"]', "data.text_ratio=1.0"])
    with pytest.raises(TextFilesError, match="gone.txt not found"):
        text_corpus(cfg.data, Tokenizer.load(), "train")
