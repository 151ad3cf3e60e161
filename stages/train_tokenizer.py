"""Stage `train_tokenizer`: train a byte-level BPE tokenizer on the pretraining text.

Params: tokenizer.vocab_size, tokenizer.min_frequency, tokenizer.special_tokens.
Output: models/tokenizer/ (tokenizer.json, special_tokens.json); reports/tokenizer.json (metrics)
and reports/tokenizer.md (token-count table, characters per token, longest tokens).
Run: `dvc repro train_tokenizer`, or try a size: `dvc exp run -S tokenizer.vocab_size=2048`.
"""

from pathlib import Path

from llmpipe import atomic
from llmpipe.errors import InputDataError, ParamError
from llmpipe.params import StageParams
from llmpipe.stage import stage
from llmpipe.tokenizer import (SPECIAL_TOKEN_ROLES, LoadedTokenizer, iterate_texts, minimum_vocab_size,
                               save_tokenizer, tokenizer_report, train_bpe)
from llmpipe.tracking import StageRun

PREPARED = Path("data/prepared")
OUTPUT_DIR = Path("models/tokenizer")


def special_tokens(params: StageParams) -> dict[str, str]:
    tokens = {role: params.str(f"tokenizer.special_tokens.{role}") for role in SPECIAL_TOKEN_ROLES}
    if len(set(tokens.values())) != len(tokens):
        raise ParamError("params.yaml: tokenizer.special_tokens: each role needs a distinct token string")
    return tokens


@stage("train_tokenizer")
def train_tokenizer(params: StageParams, run: StageRun) -> None:
    specials = special_tokens(params)
    minimum = minimum_vocab_size(specials)
    vocab_size = params.int("tokenizer.vocab_size", max=1 << 31)
    if vocab_size < minimum:
        raise ParamError(f"params.yaml: tokenizer.vocab_size: expected at least {minimum} (256 byte tokens + "
                         f"{minimum - 256} special tokens), got {vocab_size}")
    min_frequency = params.int("tokenizer.min_frequency", min=1)
    train_file = PREPARED / "pretrain_train.jsonl"
    if not train_file.is_file():
        raise InputDataError(f"{train_file}: not found; run the prepare stage first (dvc repro prepare)")

    tokenizer = train_bpe(iterate_texts(train_file), vocab_size, min_frequency, specials)
    with atomic.atomic_path(OUTPUT_DIR, directory=True) as temp:
        save_tokenizer(tokenizer, specials, temp)
    loaded = LoadedTokenizer(OUTPUT_DIR)
    metrics, report = tokenizer_report(loaded, list(iterate_texts(PREPARED / "pretrain_validation.jsonl")))
    atomic.write_json("reports/tokenizer.json", metrics)
    atomic.write_text("reports/tokenizer.md", report)
    run.log_metrics(metrics)
    run.log_artifact(OUTPUT_DIR, "tokenizer")
    run.log_artifact("reports/tokenizer.md")
    print(f"train_tokenizer: {loaded.vocab_size} tokens, "
          f"{metrics['validation_characters_per_token']:.2f} characters per token on validation text")


if __name__ == "__main__":
    train_tokenizer()
