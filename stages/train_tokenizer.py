"""Stage `train_tokenizer`: train a byte-level BPE tokenizer on the pretraining text, or, with
`base_model=hf`, take the checkpoint's own tokenizer.json (plus the chat special tokens it lacks).

Params: tokenizer.vocab_size, tokenizer.min_frequency, tokenizer.special_tokens,
tokenizer.train_sample_bytes (BPE learns from the first documents up to this many UTF-8 bytes, streamed;
null = all; see llmpipe.tokenizer.TextSample), base_model.
Output: models/tokenizer/ (tokenizer.json, special_tokens.json); reports/tokenizer.json (metrics, and the
sample trained on: bytes, documents, whether it was the whole corpus) and reports/tokenizer.md
(token-count table, characters per token, longest tokens, the sample). The validation text is streamed.
Run: `dvc repro train_tokenizer`, or try a size: `dvc exp run -S tokenizer.vocab_size=2048`.
"""

from pathlib import Path

from llmpipe.data.prepared import read_pretrain_text
from llmpipe.export.hf_import import import_tokenizer
from llmpipe.pipeline import atomic, layout
from llmpipe.pipeline.errors import ParamError
from llmpipe.pipeline.params import StageParams
from llmpipe.pipeline.stage import stage
from llmpipe.pipeline.tracking import StageRun
from llmpipe.report.markdown import tokenizer_report
from llmpipe.tokenizer import (
    SPECIAL_TOKEN_ROLES,
    LoadedTokenizer,
    TextSample,
    minimum_vocab_size,
    save_tokenizer,
    tokenizer_metrics,
    train_bpe,
)


def special_tokens(params: StageParams) -> dict[str, str]:
    tokens = {role: params.str(f"tokenizer.special_tokens.{role}") for role in SPECIAL_TOKEN_ROLES}
    if len(set(tokens.values())) != len(tokens):
        raise ParamError("params.yaml: tokenizer.special_tokens: each role needs a distinct token string")
    return tokens


def texts(split: str):
    return read_pretrain_text(layout.PRETRAIN_TEXT[split])


@stage("train_tokenizer")
def train_tokenizer(params: StageParams, run: StageRun) -> None:
    specials = special_tokens(params)
    sample_report = {}
    if params.str("base_model.source", choices=["scratch", "hf"]) == "hf":
        tokenizer, specials, chat_template, added = import_tokenizer(Path(params.str("base_model.path")), specials)
        print(f"train_tokenizer: took the tokenizer of {params.str('base_model.path')}"
              + (f", adding {', '.join(added)}" if added else "")
              + (" and its chat template" if chat_template else ""), flush=True)
    else:
        minimum = minimum_vocab_size(specials)
        vocab_size = params.int("tokenizer.vocab_size", max=1 << 31)
        if vocab_size < minimum:
            raise ParamError(f"params.yaml: tokenizer.vocab_size: expected at least {minimum} (256 byte tokens + "
                             f"{minimum - 256} special tokens), got {vocab_size}")
        max_bytes = params.get("tokenizer.train_sample_bytes")
        sample = TextSample(texts("train"), None if max_bytes is None
                            else params.int("tokenizer.train_sample_bytes", min=1))
        tokenizer = train_bpe(sample, vocab_size, params.int("tokenizer.min_frequency", min=1), specials)
        sample_report = sample.report()
        print(f"train_tokenizer: learned from {sample.documents} documents, {sample.utf8_bytes} bytes: "
              + ("the whole corpus" if sample.whole_corpus else "a prefix (tokenizer.train_sample_bytes)"), flush=True)
        chat_template = None
    with atomic.atomic_path(layout.TOKENIZER, directory=True) as temp:
        save_tokenizer(tokenizer, specials, temp, chat_template)
    loaded = LoadedTokenizer(layout.TOKENIZER)
    metrics = tokenizer_metrics(loaded, texts("validation")) | sample_report
    atomic.write_json(layout.TOKENIZER_METRICS, metrics)
    atomic.write_text(layout.TOKENIZER_REPORT, tokenizer_report(loaded, metrics, next(texts("validation"), None)))
    run.log_metrics(metrics)
    run.log_artifact(layout.TOKENIZER, "tokenizer")
    run.log_artifact(layout.TOKENIZER_REPORT)
    print(f"train_tokenizer: {loaded.vocab_size} tokens, "
          f"{metrics['validation_characters_per_token']:.2f} characters per token on validation text")


if __name__ == "__main__":
    train_tokenizer()
