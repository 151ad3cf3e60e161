"""Encode the prepared pretraining text into token shards (the tokenize stage), streamed: the JSONL is read
line by line, encoded `batch_size` documents at a time with the tokenizers library's `encode_batch` (on its
own threads) and appended to the current shard; a full shard is closed and the next begun. Memory holds one
batch; the directory is written atomically. The layout of the files: llmpipe.data.tokens."""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from llmpipe import atomic
from llmpipe.config import layout
from llmpipe.config.params import params_section, setting
from llmpipe.data.prepared import read_pretrain_text
from llmpipe.data.tokens import DTYPES
from llmpipe.errors import InputDataError, ParamError
from llmpipe.text.tokenizer import LoadedTokenizer


@params_section("tokenize")
@dataclass(frozen=True)
class TokenizeSettings:
    num_proc: int = setting(2, "encoding threads (the tokenizers library's encode_batch)", min=1)
    batch_size: int = setting(1000, "documents per encoding batch", min=1)
    token_dtype: str = setting("auto", "auto (uint16 when the vocabulary fits, else uint32) | uint16 | uint32",
                               choices=["auto", "uint16", "uint32"])
    shard_tokens: int = setting(100000000, "tokens per shard file (200 MB as uint16); a split's last shard is shorter",
                                min=1)


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
    counts = {"documents": 0, "tokens": 0, "utf8_bytes": 0}
    texts = iter(texts)
    # disable=None: no bar when stderr is not a terminal (DVC's log, CI); TQDM_DISABLE is read before a stage sets it
    with tqdm(desc=f"tokenizing {writer.split}", unit=" documents", disable=None) as progress:
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
