"""Stage `tokenize`: encode the prepared pretraining text into flat token files.

Params: tokenize.num_proc (worker processes), tokenize.batch_size, tokenize.token_dtype (auto|uint16|uint32).
Output: data/tokens/ with train.bin, validation.bin (numpy memmap) and meta.json (documents, tokens,
UTF-8 bytes per split). Run: `dvc repro tokenize`.
"""

from pathlib import Path

from llmpipe import atomic
from llmpipe.params import StageParams
from llmpipe.stage import stage
from llmpipe.tokenize_corpus import choose_dtype, encode_split
from llmpipe.tokenizer import LoadedTokenizer
from llmpipe.tracking import StageRun

PREPARED = Path("data/prepared")
TOKENIZER_DIR = Path("models/tokenizer")
OUTPUT_DIR = Path("data/tokens")


@stage("tokenize")
def tokenize(params: StageParams, run: StageRun) -> None:
    num_proc = params.int("tokenize.num_proc", min=1)
    batch_size = params.int("tokenize.batch_size", min=1)
    requested = params.str("tokenize.token_dtype", choices=["auto", "uint16", "uint32"])
    tokenizer = LoadedTokenizer(TOKENIZER_DIR)
    dtype = choose_dtype(tokenizer.vocab_size, requested)
    meta = {"dtype": dtype, "vocab_size": tokenizer.vocab_size,
            "end_of_document_id": tokenizer.end_of_document_id, "splits": {}}
    with atomic.atomic_path(OUTPUT_DIR, directory=True) as temp:
        for split in ("train", "validation"):
            counts = encode_split(PREPARED / f"pretrain_{split}.jsonl", tokenizer, temp / f"{split}.bin",
                                  dtype, num_proc, batch_size)
            meta["splits"][split] = counts
            run.log_metrics({f"{split}_{key}": value for key, value in counts.items()})
        atomic.write_json(temp / "meta.json", meta)
    print("tokenize: " + "; ".join(f"{split}: {c['documents']} documents, {c['tokens']} tokens, "
                                   f"{c['utf8_bytes']} bytes" for split, c in meta["splits"].items()))


if __name__ == "__main__":
    tokenize()
