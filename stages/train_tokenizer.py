"""Stage `train_tokenizer`: train a byte-level BPE tokenizer on the pretraining text, or, with
`base_model=hf`, take the checkpoint's own tokenizer.json (plus the chat special tokens it lacks).

Params: tokenizer.vocab_size, tokenizer.min_frequency, tokenizer.special_tokens,
tokenizer.train_sample_bytes (BPE learns from the first documents up to this many UTF-8 bytes, streamed;
null = all; see llmpipe.text.tokenizer.TextSample), base_model.
Output: models/tokenizer/ (tokenizer.json, special_tokens.json; imported: chat_template.json,
sequence_tokens.json); reports/tokenizer.json (the DVC metric:
characters per token on the validation text), reports/tokenizer_details.json (that, tokens per 100 words,
vocabulary size, and the sample trained on: bytes, documents, whether it was the whole corpus) and
reports/tokenizer.md (token-count table, longest tokens). The validation text is streamed.
Run: `dvc repro train_tokenizer`, or try a size: `dvc exp run -S tokenizer.vocab_size=2048`.
"""

from pathlib import Path

from llmpipe import atomic
from llmpipe.config import layout
from llmpipe.config.params import StageParams
from llmpipe.data.prepared import read_pretrain_text
from llmpipe.hf.base_model import BaseModelSettings, base_model_settings
from llmpipe.hf.tokenizer import import_tokenizer
from llmpipe.report.markdown import tokenizer_report
from llmpipe.report.tables import TOKENIZER_METRICS, dvc_metrics
from llmpipe.runner.stage import stage
from llmpipe.text.tokenizer import (
    LoadedTokenizer,
    TextSample,
    TokenizerSettings,
    save_tokenizer,
    tokenizer_metrics,
    train_bpe,
)
from llmpipe.tracking.stage_run import StageRun


def texts(split: str):
    return read_pretrain_text(layout.PRETRAIN_TEXT[split])


def read_settings(params: StageParams) -> tuple[TokenizerSettings, BaseModelSettings]:
    return params.read(TokenizerSettings), base_model_settings(params)


@stage("train_tokenizer", read_settings)
def train_tokenizer(both: tuple[TokenizerSettings, BaseModelSettings], params: StageParams, run: StageRun) -> None:
    settings, base_model = both
    specials = settings.special_tokens.by_role()
    sample_report = {}
    if base_model.source == "hf":
        imported = import_tokenizer(Path(base_model.path), specials)
        tokenizer, specials, chat_template = imported.tokenizer, imported.special_tokens, imported.chat_template
        sequence_tokens, sentencepiece = imported.sequence_tokens, imported.sentencepiece
        print(f"train_tokenizer: took the tokenizer of {base_model.path}"
              + (f", adding {', '.join(imported.added)}" if imported.added else "")
              + (" and its chat template" if chat_template else "")
              + f"; BOS {sequence_tokens['bos']} ({'added' if sequence_tokens['add_bos'] else 'not added'}), "
              f"EOS {sequence_tokens['eos']}, padding {sequence_tokens['pad']}", flush=True)
    else:
        sample = TextSample(texts("train"), settings.train_sample_bytes)
        tokenizer = train_bpe(sample, settings.vocab_size, settings.min_frequency, specials)
        sample_report = sample.report()
        print(f"train_tokenizer: learned from {sample.documents} documents, {sample.utf8_bytes} bytes: "
              + ("the whole corpus" if sample.whole_corpus else "a prefix (tokenizer.train_sample_bytes)"), flush=True)
        chat_template = sequence_tokens = sentencepiece = None
    with atomic.atomic_path(layout.TOKENIZER, directory=True) as temp:
        save_tokenizer(tokenizer, specials, temp, chat_template, sequence_tokens, sentencepiece)
    loaded = LoadedTokenizer(layout.TOKENIZER)
    metrics = tokenizer_metrics(loaded, texts("validation")) | sample_report
    atomic.write_json(layout.TOKENIZER_METRICS, dvc_metrics(metrics, TOKENIZER_METRICS))
    atomic.write_json(layout.TOKENIZER_DETAILS, metrics)
    atomic.write_text(layout.TOKENIZER_REPORT, tokenizer_report(loaded, metrics, next(texts("validation"), None)))
    run.log_metrics(metrics)
    run.log_artifact(layout.TOKENIZER, "tokenizer")
    run.log_artifact(layout.TOKENIZER_REPORT)
    print(f"train_tokenizer: {loaded.vocab_size} tokens, "
          f"{metrics['validation_characters_per_token']:.2f} characters per token on validation text")


if __name__ == "__main__":
    train_tokenizer()
