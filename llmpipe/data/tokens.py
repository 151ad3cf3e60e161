"""Token files: the pretraining corpus encoded into fixed-size shards, read with memory that does not grow
with the corpus.

    data/tokens/
      meta.json                   dtype, vocab_size, tokenizer_fingerprint, end_of_document_id, shard_tokens
                                  and per split: documents, tokens, utf8_bytes, shards [{"file", "tokens"}]
      train/shard-00000.bin ...   raw little-endian arrays (uint16 when the vocabulary fits in 65,536 ids,
      validation/shard-00000.bin  else uint32) of `tokenize.shard_tokens` tokens each, a split's last shorter

A split is one stream of tokens cut into shards: documents follow each other, each ended by the
end-of-document token, across shard boundaries. Bytes (of the original text) are what bits-per-byte is
measured against.

Writing: llmpipe.data.encode (the tokenize stage).
Reading (`open_tokens(split)`) gives a `TokenShards`: an array-like over the split's shards that checks
meta.json and every shard's size at once and memory-maps a shard only when first read; every read checks
the token ids are inside the vocabulary. `len(tokens)`,
`tokens[a:b]` (a numpy array; a window across a shard boundary is joined) and `tokens[i]`;
`token_chunks(tokens)` goes over a whole split in arrays of at most CHUNK_TOKENS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from llmpipe.config import layout
from llmpipe.errors import InputDataError

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian on every machine
CHUNK_TOKENS = 1 << 24  # tokens read at a time when going over a whole split


def _valid_meta(meta) -> bool:
    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    splits = meta["splits"]
    return (meta["dtype"] in DTYPES and count(meta["vocab_size"]) and meta["vocab_size"] > 0
            and count(meta["shard_tokens"]) and meta["shard_tokens"] > 0
            and all(count(splits[split][key]) for split in layout.TEXT_SPLITS
                    for key in ("documents", "tokens", "utf8_bytes"))
            and all(shard["file"] == layout.token_shard(split, i).as_posix() and count(shard["tokens"])
                    and shard["tokens"] > 0
                    for split in layout.TEXT_SPLITS for i, shard in enumerate(splits[split]["shards"]))
            and all(sum(shard["tokens"] for shard in splits[split]["shards"]) == splits[split]["tokens"]
                    for split in layout.TEXT_SPLITS))


def read_meta(tokens_dir: str | Path = layout.TOKENS) -> dict:
    path = Path(tokens_dir) / layout.TOKENS_META.name
    if not path.is_file():
        raise InputDataError(f"{path}: not found; run the tokenize stage first (dvc repro tokenize)")
    try:
        meta = json.loads(path.read_text("utf-8"))
        valid = _valid_meta(meta)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise InputDataError(f"{path}: not the token files' metadata the tokenize stage writes (dtype uint16|uint32, "
                             "vocab_size, shard_tokens, per-split counts and shards whose tokens add up); rerun it "
                             "(dvc repro tokenize --force)")
    return meta


class TokenShards:
    """A split's tokens over its shard files, read as one array: each shard is memory-mapped when first read.
    Every read checks its token ids against the vocabulary (a max over what is read: no extra pass), so a shard
    edited or damaged on disk is one line naming the file, not an index error deep in the model."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: str, vocab_size: int | None = None):
        self.paths, self.dtype, self.vocab_size = paths, DTYPES[dtype], vocab_size
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # shard i: [starts[i], starts[i+1])
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, index: int) -> np.memmap:
        if index not in self._maps:
            self._maps[index] = np.memmap(self.paths[index], dtype=self.dtype, mode="r")
        return self._maps[index]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("token shards are sliced with step 1")
            return self.read(start, stop)
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} of {len(self)}")
        return self.read(index, index + 1)[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as a numpy array: a view of the shard's memory map when it lies in one shard."""
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left")) - 1
        pieces = [np.asarray(self._shard(i)[max(start - self.starts[i], 0):stop - self.starts[i]])
                  for i in range(first, last + 1)]
        if self.vocab_size is not None:
            for index, piece in zip(range(first, last + 1), pieces):
                self._check_ids(index, piece, max(start - self.starts[index], 0))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _check_ids(self, shard: int, piece: np.ndarray, offset: int) -> None:
        if piece.size and int(piece.max()) >= self.vocab_size:
            position = int(np.argmax(piece >= self.vocab_size))
            raise InputDataError(f"{self.paths[shard]}: token {offset + position} is id {int(piece[position])}, "
                                 f"outside the {self.vocab_size}-token vocabulary (meta.json); rerun the tokenize "
                                 "stage (dvc repro tokenize --force)")


def token_chunks(tokens, start: int = 0, size: int = CHUNK_TOKENS) -> Iterator[np.ndarray]:
    """Tokens [start:] of a split (TokenShards, or any array) as consecutive arrays of at most `size`,
    for going over a whole split with bounded memory."""
    for begin in range(start, len(tokens), size):
        yield np.asarray(tokens[begin:begin + size])


def open_tokens(split: str, tokens_dir: str | Path = layout.TOKENS) -> TokenShards:
    """The tokens of a split, over its memory-mapped shards; every shard's size is checked now."""
    meta = read_meta(tokens_dir)
    itemsize = DTYPES[meta["dtype"]].itemsize
    paths, counts = [], []
    for shard in meta["splits"][split]["shards"]:
        path = Path(tokens_dir) / shard["file"]
        expected = shard["tokens"] * itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise InputDataError(f"{path}: missing or not {expected} bytes ({shard['tokens']} tokens) as meta.json "
                                 "says; rerun the tokenize stage (dvc repro tokenize --force)")
        paths.append(path)
        counts.append(shard["tokens"])
    return TokenShards(paths, counts, meta["dtype"], meta["vocab_size"])
