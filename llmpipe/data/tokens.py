"""Token files: the pretraining corpus encoded into fixed-size shards, written and read with memory that
does not grow with the corpus.

    data/tokens/
      meta.json                   dtype, vocab_size, tokenizer_fingerprint, end_of_document_id, shard_tokens
                                  and per split: documents, tokens, utf8_bytes, shards [{"file", "tokens"}]
      train/shard-00000.bin ...   raw little-endian arrays (uint16 when the vocabulary fits in 65,536 ids,
      validation/shard-00000.bin  else uint32) of `tokenize.shard_tokens` tokens each, a split's last shorter

A split is one stream of tokens cut into shards: documents follow each other, each ended by the
end-of-document token, across shard boundaries. Bytes (of the original text) are what bits-per-byte is
measured against.

Writing (`tokenize_corpus`) streams: the prepared JSONL is read line by line, encoded `batch_size` documents
at a time with the tokenizers library's `encode_batch` (on its own threads), and appended to the current
shard; a full shard is closed and the next begun. Memory holds one batch. The directory is written atomically.

Reading (`open_tokens(split)`) gives a `TokenShards`: an array-like over the split's shards that checks
meta.json and every shard's size at once and memory-maps a shard only when first read. `len(tokens)`,
`tokens[a:b]` (a numpy array; a window across a shard boundary is joined) and `tokens[i]`;
`token_chunks(tokens)` goes over a whole split in arrays of at most CHUNK_TOKENS.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llmpipe.data.prepared import read_pretrain_text
from llmpipe.pipeline import atomic, layout
from llmpipe.pipeline.errors import InputDataError, ParamError
from llmpipe.tokenizer import LoadedTokenizer

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian on every machine
CHUNK_TOKENS = 1 << 24  # tokens read at a time when going over a whole split


def choose_dtype(vocab_size: int, requested: str) -> str:
    """`auto` → the smallest type that holds every id; a requested type must hold them too."""
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if vocab_size > np.iinfo(DTYPES[requested]).max + 1:
        raise ParamError(f"params.yaml: tokenize.token_dtype: {requested} holds at most "
                         f"{np.iinfo(DTYPES[requested]).max + 1} ids but the tokenizer has {vocab_size}")
    return requested


class ShardWriter:
    """Appends tokens to `<tokens dir>/<split>/shard-NNNNN.bin` files of `shard_tokens` tokens each;
    `shards` lists them ({"file": path relative to the tokens directory, "tokens": count})."""

    def __init__(self, tokens_dir: Path, split: str, dtype: str, shard_tokens: int):
        self.tokens_dir, self.split, self.dtype, self.shard_tokens = tokens_dir, split, DTYPES[dtype], shard_tokens
        self.shards: list[dict] = []
        self._handle = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._handle is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            take = min(len(tokens), self.shard_tokens - self.shards[-1]["tokens"])
            tokens[:take].tofile(self._handle)
            self.shards[-1]["tokens"] += take
            tokens = tokens[take:]

    def _next_shard(self) -> None:
        self._stack.close()
        name = layout.token_shard(self.split, len(self.shards))
        (self.tokens_dir / name).parent.mkdir(parents=True, exist_ok=True)
        self._handle = self._stack.enter_context(open(self.tokens_dir / name, "wb"))
        self.shards.append({"file": name.as_posix(), "tokens": 0})


def encode_documents(texts: Iterable[str], tokenizer: LoadedTokenizer, writer: ShardWriter,
                     batch_size: int) -> dict:
    """Encode documents `batch_size` at a time, each followed by the end-of-document token, into `writer`;
    returns the counts (documents, tokens, utf8_bytes)."""
    from tqdm import tqdm  # switched off (TQDM_DISABLE) when the output is not a terminal

    counts = {"documents": 0, "tokens": 0, "utf8_bytes": 0}
    texts = iter(texts)
    with tqdm(desc=f"tokenizing {writer.split}", unit=" documents") as progress:
        while batch := list(itertools.islice(texts, batch_size)):
            ids = tokenizer.encode_batch(batch)
            tokens = np.fromiter(itertools.chain.from_iterable((*i, tokenizer.end_of_document_id) for i in ids),
                                 dtype=writer.dtype, count=sum(len(i) + 1 for i in ids))
            writer.write(tokens)
            counts["documents"] += len(batch)
            counts["tokens"] += len(tokens)
            counts["utf8_bytes"] += sum(len(t.encode("utf-8")) for t in batch)
            progress.update(len(batch))
    return counts


def tokenize_corpus(tokenizer: LoadedTokenizer, dtype: str, threads: int, batch_size: int,
                    shard_tokens: int, tokens_dir: str | Path = layout.TOKENS) -> dict:
    """Encode every pretraining split into sharded token files (the directory written atomically);
    returns meta.json's content. `threads`: the tokenizers library's encoding threads (read when it first
    encodes in parallel, so set before)."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    meta = {"dtype": dtype, "vocab_size": tokenizer.vocab_size, "tokenizer_fingerprint": tokenizer.fingerprint,
            "end_of_document_id": tokenizer.end_of_document_id, "shard_tokens": shard_tokens, "splits": {}}
    with atomic.atomic_path(tokens_dir, directory=True) as temp:
        for split in layout.TEXT_SPLITS:
            path = layout.PRETRAIN_TEXT[split]
            with ShardWriter(temp, split, dtype, shard_tokens) as writer:
                counts = encode_documents(read_pretrain_text(path), tokenizer, writer, batch_size)
            if not counts["documents"]:
                raise InputDataError(f"{path}: no documents")
            meta["splits"][split] = counts | {"shards": writer.shards}
        atomic.write_json(temp / layout.TOKENS_META.name, meta)
    return meta


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
    """A split's tokens over its shard files, read as one array: each shard is memory-mapped when first read."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: str):
        self.paths, self.dtype = paths, DTYPES[dtype]
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
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


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
    return TokenShards(paths, counts, meta["dtype"])
