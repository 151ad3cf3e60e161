"""Stage `tokenize`: encode the prepared pretraining text into flat token files.

Params: tokenize.num_proc (worker processes), tokenize.batch_size, tokenize.token_dtype (auto|uint16|uint32).
Output: data/tokens/ with train.bin, validation.bin (numpy memmap) and meta.json (documents, tokens,
UTF-8 bytes per split). Run: `dvc repro tokenize`.
"""

from llmpipe.data.tokens import choose_dtype, tokenize_corpus
from llmpipe.pipeline import layout
from llmpipe.pipeline.params import StageParams
from llmpipe.pipeline.stage import stage
from llmpipe.pipeline.tracking import StageRun
from llmpipe.tokenizer import LoadedTokenizer


@stage("tokenize")
def tokenize(params: StageParams, run: StageRun) -> None:
    num_proc = params.int("tokenize.num_proc", min=1)
    batch_size = params.int("tokenize.batch_size", min=1)
    requested = params.str("tokenize.token_dtype", choices=["auto", "uint16", "uint32"])
    tokenizer = LoadedTokenizer(layout.TOKENIZER)
    dtype = choose_dtype(tokenizer.vocab_size, requested)
    meta = tokenize_corpus(tokenizer, dtype, num_proc, batch_size)
    for split, counts in meta["splits"].items():
        run.log_metrics({f"{split}_{key}": value for key, value in counts.items()})
    print("tokenize: " + "; ".join(f"{split}: {c['documents']} documents, {c['tokens']} tokens, "
                                   f"{c['utf8_bytes']} bytes" for split, c in meta["splits"].items()))


if __name__ == "__main__":
    tokenize()
