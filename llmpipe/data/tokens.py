"""Encode text into flat token files: the pretraining corpus as one numpy array per split.

Each split becomes `<split>.bin`, a raw little-endian array (uint16 when the vocabulary fits in
65,536 ids, else uint32) that `numpy.memmap` opens without loading it; documents are separated by
the end-of-document token. `meta.json` records dtype, vocabulary size and, per split, the number of
documents, tokens and UTF-8 bytes (bytes are what bits-per-byte is measured against).
Encoding runs through `datasets.map(batched=True, num_proc=N)`, with a progress bar.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from llmpipe.pipeline import atomic, layout
from llmpipe.pipeline.errors import InputDataError, ParamError
from llmpipe.tokenizer import LoadedTokenizer

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def choose_dtype(vocab_size: int, requested: str) -> str:
    """`auto` → the smallest type that holds every id; a requested type must hold them too."""
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if vocab_size > np.iinfo(DTYPES[requested]).max + 1:
        raise ParamError(f"params.yaml: tokenize.token_dtype: {requested} holds at most "
                         f"{np.iinfo(DTYPES[requested]).max + 1} ids but the tokenizer has {vocab_size}")
    return requested


class _BatchEncoder:
    """Picklable map function for datasets (one tokenizer per worker process)."""

    def __init__(self, tokenizer_file: str, end_of_document_id: int):
        self.tokenizer_file = tokenizer_file
        self.end_of_document_id = end_of_document_id
        self._tokenizer = None

    def __call__(self, batch: dict) -> dict:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(self.tokenizer_file)
            self._tokenizer.encode_special_tokens = True  # a special token's string in the text is just text
        encodings = self._tokenizer.encode_batch(batch["text"], add_special_tokens=False)
        ids = [e.ids + [self.end_of_document_id] for e in encodings]
        return {"ids": ids, "length": [len(i) for i in ids],
                "utf8_bytes": [len(t.encode("utf-8")) for t in batch["text"]]}


def encode_split(jsonl_path: Path, tokenizer: LoadedTokenizer, output_path: Path, dtype: str,
                 num_proc: int, batch_size: int) -> dict:
    """Encode one JSONL split into `output_path`; returns its counts."""
    import datasets

    if not jsonl_path.is_file():
        raise InputDataError(f"{jsonl_path}: not found; run the prepare stage first (dvc repro prepare)")
    with tempfile.TemporaryDirectory(prefix="llmpipe-tokenize-") as cache_dir:
        dataset = datasets.load_dataset("json", data_files=str(jsonl_path), split="train", cache_dir=cache_dir)
        if len(dataset) == 0:
            raise InputDataError(f"{jsonl_path}: no documents")
        encoder = _BatchEncoder(str(tokenizer.directory / "tokenizer.json"), tokenizer.end_of_document_id)
        encoded = dataset.map(encoder, batched=True, batch_size=batch_size,
                              num_proc=num_proc if num_proc > 1 and len(dataset) >= 2 * num_proc else None,
                              remove_columns=dataset.column_names, desc=f"tokenizing {jsonl_path.name}")
        total = int(sum(encoded["length"]))  # a small column: the token ids stay on disk until written
        array = np.memmap(output_path, dtype=DTYPES[dtype], mode="w+", shape=(total,))
        position = 0
        for batch in encoded.iter(batch_size=batch_size):
            flat = np.fromiter((i for ids in batch["ids"] for i in ids), dtype=np.int64)
            array[position:position + len(flat)] = flat
            position += len(flat)
        array.flush()
        del array
        return {"documents": len(dataset), "tokens": total, "utf8_bytes": int(sum(encoded["utf8_bytes"]))}


def tokenize_corpus(tokenizer: LoadedTokenizer, dtype: str, num_proc: int, batch_size: int) -> dict:
    """Encode every pretraining split into the token directory (atomically); returns meta.json's content."""
    meta = {"dtype": dtype, "vocab_size": tokenizer.vocab_size, "tokenizer_fingerprint": tokenizer.fingerprint,
            "end_of_document_id": tokenizer.end_of_document_id, "splits": {}}
    with atomic.atomic_path(layout.TOKENS, directory=True) as temp:
        for split, text_file in layout.PRETRAIN_TEXT.items():
            meta["splits"][split] = encode_split(text_file, tokenizer, temp / f"{split}.bin", dtype, num_proc, batch_size)
        atomic.write_json(temp / layout.TOKENS_META.name, meta)
    return meta


def read_meta(tokens_dir: str | Path = layout.TOKENS) -> dict:
    path = Path(tokens_dir) / layout.TOKENS_META.name
    if not path.is_file():
        raise InputDataError(f"{path}: not found; run the tokenize stage first (dvc repro tokenize)")
    try:
        meta = json.loads(path.read_text("utf-8"))
        valid = (meta["dtype"] in DTYPES and isinstance(meta["vocab_size"], int) and meta["vocab_size"] > 0
                 and all(isinstance(meta["splits"][split][count], int) for split in layout.TEXT_SPLITS
                         for count in ("documents", "tokens", "utf8_bytes")))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        valid, meta = False, exc
    if not valid:
        raise InputDataError(f"{path}: not the token files' metadata the tokenize stage writes (dtype uint16|uint32, "
                             "vocab_size, per-split counts); rerun it (dvc repro tokenize --force)")
    return meta


def open_tokens(split: str, tokens_dir: str | Path = layout.TOKENS) -> np.ndarray:
    """The token array of a split, memory-mapped read-only."""
    meta = read_meta(tokens_dir)
    path = Path(tokens_dir) / f"{split}.bin"
    expected = meta["splits"][split]["tokens"] * np.dtype(meta["dtype"]).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise InputDataError(f"{path}: missing or not {expected} bytes as meta.json says; rerun the tokenize stage")
    return np.memmap(path, dtype=DTYPES[meta["dtype"]], mode="r")
