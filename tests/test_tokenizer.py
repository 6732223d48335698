import numpy as np
import pytest

from mmtrain.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
    pad_batch,
    save_tokenizer,
)

CAPTIONS = [
    "a dog runs on the beach",
    "a cat sleeps on a red sofa",
    "two dogs play with a ball in the park",
    "一只猫在沙发上睡觉",
    "the sound of rain on a tin roof 🌧️",
    "a man plays the guitar on stage",
] * 20


@pytest.mark.parametrize("text", ["hello world", "一只猫在沙发上睡觉", "rain 🌧️ and 🐶", "", "naïve café"])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert all(3 <= i < tok.vocab_size for i in ids[1:-1])
    assert tok.vocab_size == 259 and tok.pad_id == 0
    assert tok.decode(ids) == text


def test_byte_truncation_keeps_eos_and_whole_characters():
    tok = ByteTokenizer()
    ids = tok.encode("猫" * 10, max_len=8)  # 3 bytes per character: 6 slots hold 2 characters
    assert len(ids) <= 8 and ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "猫猫"
    ids = tok.encode("abcdefghij", max_len=5)
    assert ids == [1, ord("a") + 3, ord("b") + 3, ord("c") + 3, 2]


def test_bpe_train_save_load_round_trip(tmp_path):
    tok = build_tokenizer("bpe", texts=CAPTIONS, vocab_size=400)
    assert isinstance(tok, BPETokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size <= 400
    for text in ["a dog plays with a cat", "一只狗在公园里", "unseen wörds 🎸"]:  # nothing is UNK
        ids = tok.encode(text)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == text
    # BPE merges make in-corpus captions shorter than their bytes
    assert len(tok.encode(CAPTIONS[0])) < len(ByteTokenizer().encode(CAPTIONS[0]))

    save_tokenizer(tok, str(tmp_path / "tok"))
    again = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(again, BPETokenizer) and again.vocab_size == tok.vocab_size
    for text in CAPTIONS[:6]:
        assert again.encode(text, 16) == tok.encode(text, 16)

    ids = tok.encode(" ".join(CAPTIONS), max_len=12)
    assert len(ids) == 12 and ids[0] == 1 and ids[-1] == 2


def test_byte_save_load_and_factory(tmp_path):
    save_tokenizer(build_tokenizer("byte"), str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, ByteTokenizer) and tok.to_dict() == {"kind": "byte", "vocab_size": 259}
    with pytest.raises(ValueError):
        build_tokenizer("bpe")  # needs texts
    with pytest.raises(ValueError):
        build_tokenizer("wordpiece")


def test_pad_batch():
    out = pad_batch([[1, 5, 2], [1, 2]], pad_id=0, max_len=4)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [[1, 5, 2, 0], [1, 2, 0, 0]])
    assert pad_batch([[1, 5, 2], [1, 2]], pad_id=0).shape == (2, 3)
    with pytest.raises(ValueError):
        pad_batch([[1, 5, 6, 7, 2]], pad_id=0, max_len=4)
