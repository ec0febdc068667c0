"""Text corpus: passages start at line starts, EOS-worthy ends at line ends, on-disk cache is safe."""

import numpy as np

from transfusion.data import text_corpus
from transfusion.tokenizer import Tokenizer

TEXTS = ["First line here.\nSecond line, longer than the first one.\nThird.\n", "Another play.\nIts end.\n"]


def test_passages_follow_lines():
    tok = Tokenizer.load()
    corpus = text_corpus.build_corpus(tok, TEXTS)
    rng = np.random.default_rng(0)
    nl = tok.encode("\n")[0]
    for _ in range(200):
        ids, complete = corpus.sample(rng, 12)
        assert 0 < len(ids) <= 12
        text = tok.decode(ids)
        assert text[:1].isupper()  # every line of TEXTS starts with a capital: passages start at a line
        if complete:
            assert ids[-1] == nl
        assert "play" not in text or "Third" not in text  # never crosses from one text into the next


def test_disk_cache_hit_and_damaged_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFUSION_CACHE", str(tmp_path))
    tok = Tokenizer.load()
    calls = []

    def load():
        calls.append(1)
        return TEXTS

    a = text_corpus.cached_corpus(tok, "k1", load)
    b = text_corpus.cached_corpus(tok, "k1", load)
    assert len(calls) == 1 and np.array_equal(a.ids, b.ids) and np.array_equal(a.line_starts, b.line_starts)
    (cache,) = tmp_path.glob("corpus-*.npz")
    cache.write_bytes(b"garbage")
    c = text_corpus.cached_corpus(tok, "k1", load)
    assert len(calls) == 2 and np.array_equal(a.ids, c.ids)
