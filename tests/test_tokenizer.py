import pytest

from transfusion.config import ModelConfig
from transfusion.data import fashion
from transfusion.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, train_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.mark.parametrize("text", [
    "a red sneaker",
    "a photo of an orange bag",
    "HAMLET:\nTo be, or not to be: that is the question:\n",
    "  leading spaces, tabs\tand émojis 🎩 — all bytes round-trip  ",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(i not in tok.special_ids for i in ids)
    assert tok.decode(ids) == text


def test_specials_and_vocab(tok):
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id] == [0, 1, 2, 3, 4]
    assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert tok.vocab_size == 2048 <= ModelConfig.from_name("tiny").vocab_size
    # specials are skipped on decode and never produced by encode of their literal text
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"
    ids = tok.encode("a <boi> in a caption")
    assert not set(ids) & tok.special_ids and tok.decode(ids) == "a <boi> in a caption"


def test_caption_words_are_single_tokens(tok):
    # captions stay short: each word of every caption phrasing is one token (with its leading space)
    for item in range(len(fashion.ITEMS)):
        for colour in range(len(fashion.COLOUR_NAMES)):
            cap = fashion.caption(item, colour, 1)
            assert len(tok.encode(cap)) <= len(cap.replace("-", " - ").split()) + 1, cap


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found.*build_tokenizer"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(bad)


def test_training_is_deterministic():
    texts = ["to be or not to be", "a red sneaker", "a blue bag"] * 20
    a, b = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts, vocab_size=300)
    assert a.hf.to_str() == b.hf.to_str()
