"""Stage `tokenize`: encode the prepared pretraining text into sharded token files, streamed.

Params: tokenize.num_proc (encoding threads of the tokenizers library), tokenize.batch_size (documents
per encode_batch), tokenize.token_dtype (auto|uint16|uint32), tokenize.shard_tokens (tokens per shard file).
Output: data/tokens/ with <split>/shard-NNNNN.bin (raw arrays, read through numpy memmap) and meta.json
(documents, tokens, UTF-8 bytes and shards per split); see llmpipe.data.tokens. Memory holds one batch of
documents whatever the corpus size. Run: `dvc repro tokenize`.
"""

from llmpipe.config import layout
from llmpipe.config.params import StageParams
from llmpipe.data.encode import TokenizeSettings, choose_dtype, tokenize_corpus
from llmpipe.runner.stage import stage
from llmpipe.text.tokenizer import LoadedTokenizer
from llmpipe.tracking.stage_run import StageRun


def read_settings(params: StageParams) -> TokenizeSettings:
    return params.read(TokenizeSettings)


@stage("tokenize", read_settings)
def tokenize(settings: TokenizeSettings, params: StageParams, run: StageRun) -> None:
    tokenizer = LoadedTokenizer(layout.TOKENIZER)
    dtype = choose_dtype(tokenizer.vocab_size, settings.token_dtype)
    meta = tokenize_corpus(tokenizer, dtype, settings.num_proc, settings.batch_size, settings.shard_tokens)
    for split, counts in meta["splits"].items():
        run.log_metrics({f"{split}_{key}": counts[key] for key in ("documents", "tokens", "utf8_bytes")}
                        | {f"{split}_shards": len(counts["shards"])})
    print("tokenize: " + "; ".join(f"{split}: {c['documents']} documents, {c['tokens']} tokens, "
                                   f"{c['utf8_bytes']} bytes, {len(c['shards'])} shard(s)"
                                   for split, c in meta["splits"].items()))


if __name__ == "__main__":
    tokenize()
