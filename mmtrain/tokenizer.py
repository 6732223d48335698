"""Caption tokenizers. Nothing is downloaded: bytes need no vocabulary, BPE is trained on the corpus.

Both share one id layout for the specials, which the model and the batch contract rely on:
PAD = 0, BOS = 1, EOS = 2. A caption is encoded as BOS + ids + EOS, truncated to `max_len`
keeping the EOS, so the model always sees where a caption ends.

  ByteTokenizer  UTF-8 bytes, byte b -> b + 3, vocab 259. Any language round-trips, no training.
  BPETokenizer   byte-level BPE from the `tokenizers` package: about 3-4x fewer tokens for
                 English, so more caption fits in max_text_len. Byte-level, so nothing is UNK.

A tokenizer is saved as a directory: `tokenizer.json` (a small descriptor, {"kind": ...}) plus,
for BPE, the `tokenizers` file `bpe.json`.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

from pipelines.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DESCRIPTOR = "tokenizer.json"
BPE_FILE = "bpe.json"


def _wrap(ids: list[int], max_len: int | None) -> list[int]:
    """BOS + ids + EOS, truncated to max_len while keeping EOS last."""
    if max_len is not None:
        if max_len < 2:
            raise ValueError(f"max_len must leave room for BOS and EOS, got {max_len}")
        ids = ids[: max_len - 2]
    return [BOS_ID, *ids, EOS_ID]


class ByteTokenizer:
    name = "byte"
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    offset = 3  # byte b -> b + 3, after the specials
    vocab_size = 256 + offset

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        data = text.encode("utf-8")
        if max_len is not None and len(data) > max_len - 2:
            # Cut on a character boundary: never keep the first bytes of a multi-byte character
            # (UTF-8 continuation bytes are 0b10xxxxxx).
            cut = max(max_len - 2, 0)
            while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
                cut -= 1
            data = data[:cut]
        return _wrap([b + self.offset for b in data], max_len)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.name, "vocab_size": self.vocab_size}


class BPETokenizer:
    name = "bpe"
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    specials = ("[PAD]", "[BOS]", "[EOS]")  # given to the trainer first, so they get ids 0, 1, 2

    def __init__(self, tokenizer) -> None:  # a tokenizers.Tokenizer
        self.tok = tokenizer
        for i, s in enumerate(self.specials):
            if tokenizer.token_to_id(s) != i:
                raise ValueError(f"BPE vocab has {s} at id {tokenizer.token_to_id(s)}, expected {i}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        # Byte-level: text is split into bytes mapped to printable symbols, and the 256 of them are
        # all in the initial alphabet, so any string (Chinese, emoji) encodes without an UNK.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(cls.specials),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(path))

    def save(self, path: str) -> None:
        self.tok.save(path)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        return _wrap(self.tok.encode(text, add_special_tokens=False).ids, max_len)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"kind": self.name, "vocab_size": self.vocab_size, "file": BPE_FILE}


Tokenizer = ByteTokenizer | BPETokenizer


def build_tokenizer(kind: str = "byte", texts: Iterable[str] | None = None, vocab_size: int = 8000) -> Tokenizer:
    """"byte" needs nothing; "bpe" is trained on `texts` (the corpus's captions)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None:
            raise ValueError("a BPE tokenizer is trained on the captions: pass texts=")
        return BPETokenizer.train(texts, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'byte' or 'bpe'")


def save_tokenizer(tok: Tokenizer, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    if isinstance(tok, BPETokenizer):
        tok.save(os.path.join(directory, BPE_FILE))
    with open(os.path.join(directory, DESCRIPTOR), "w") as f:
        json.dump(tok.to_dict(), f, indent=2)


def load_tokenizer(directory: str) -> Tokenizer:
    with open(os.path.join(directory, DESCRIPTOR)) as f:
        desc = json.load(f)
    kind = desc.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.load(os.path.join(directory, desc.get("file", BPE_FILE)))
    raise ConfigError(f"{os.path.join(directory, DESCRIPTOR)}: unknown tokenizer kind {kind!r}")


def tokenizer_from_dict(desc: dict, bpe_json: str | None = None) -> Tokenizer:
    """The tokenizer a descriptor (`to_dict()`) names; a BPE one needs its vocabulary, the
    content of its bpe.json (an exported model carries both in its metadata)."""
    kind = desc.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if not bpe_json:
            raise ConfigError("a BPE tokenizer descriptor without its vocabulary")
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(bpe_json))
    raise ConfigError(f"unknown tokenizer kind {kind!r}")


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID, max_len: int | None = None) -> np.ndarray:
    """Right-pad token lists into an int64 [N, max_len] array (max_len defaults to the longest).

    A sequence longer than max_len is an error rather than silently cut: cutting here would drop
    its EOS; truncate with `encode(text, max_len)` instead.
    """
    longest = max((len(s) for s in seqs), default=0)
    width = longest if max_len is None else max_len
    if longest > width:
        raise ValueError(f"a sequence has {longest} tokens, more than max_len {width}; truncate with encode()")
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out
