"""`transfusion tokenizer CORPUS... --out tokenizer.json --vocab-size N` and `data.tokenizer = PATH`."""

from __future__ import annotations

import json
import re

import pytest

from transfusion import config
from transfusion.cli import main
from transfusion.data.loader import build_loader
from transfusion.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXT = "".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200))


def test_trains_a_tokenizer_the_project_loads(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TRANSFUSION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text(TEXT + "HELDOUT_ONLY_WORD zebra\n" * 20)
    (tmp_path / "b.jsonl").write_text("\n".join([json.dumps({"text": "a jsonl document about foxes"})] * 30
                                                + ["broken {", json.dumps({"text": 3})]) + "\n")
    out = tmp_path / "tok" / "tokenizer.json"
    rc = main(["tokenizer", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--out", str(out),
               "--vocab-size", "400", "--heldout", "0.1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "wrote" in captured.out and "model.vocab_size=" in captured.out
    assert "2 skipped" in captured.err and "bad_line" in captured.err and "no_text" in captured.err
    tok = Tokenizer.load(out)
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]  # the project's specials, in order
    assert 261 < tok.vocab_size <= 400
    assert len(tok.encode("the quick brown fox")) <= 4  # frequent words became tokens
    assert "zebra" not in tok.hf.get_vocab() and "Ġzebra" not in tok.hf.get_vocab()  # the held-out tail is unseen
    text = "unseen bytes round-trip: é, 🦊, <boi>"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown; "<boi>" in text stays text
    assert tok.boi_id not in tok.encode(text)
    assert not list(out.parent.glob(".*tmp"))

    cfg = config.load(None, [f'data.tokenizer="{out}"', f'data.text_files=["{tmp_path / "a.txt"}"]',
                             "data.text_ratio=1.0", "train.batch_size=2", "data.seq_len=32",
                             f"model.vocab_size={tok.vocab_size}"])
    batch = next(build_loader(cfg, Tokenizer.load(cfg.data.tokenizer)))
    assert int(batch.tokens.max()) < tok.vocab_size and int((batch.tokens == tok.bos_id).sum()) >= 2


@pytest.mark.parametrize("args, message", [
    (["MISSING"], "MISSING not found"),
    (["EMPTY"], "no train text"),
    (["GOOD", "--vocab-size", "100"], "below 261"),
    (["GOOD", "--heldout", "2"], r"\[0, 1\)"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, args, message) -> None:
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "GOOD").write_text(TEXT)
    argv = ["tokenizer", *[str(tmp_path / a) if a.isupper() else a for a in args], "--out", str(tmp_path / "t.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0])
    assert not (tmp_path / "t.json").exists()
