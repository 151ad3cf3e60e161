"""Every artifact of the pipeline, named once: the paths stages read and write, relative to the repository
root (DVC runs every stage there). dvc.yaml lists them as each stage's deps and outs; tests/test_layout.py
checks the two agree.

DVC compares each stage's few headline metrics (METRICS, TOKENIZER_METRICS, EVALUATE_METRICS); DETAILS,
TOKENIZER_DETAILS, TIMINGS (machine noise), SIZES_JSON, VARIANTS_TABLE and EFFECTIVE_PARAMS are outputs it keeps but
does not compare.
"""

from __future__ import annotations

import os
from pathlib import Path

TEXT_SPLITS = ("train", "validation")
# Question/answer sets, by whose facts they ask about: the fine-tuned people (their QA pairs are the
# fine-tuning examples), the validation people (they pick the best fine-tuning step) and the held-out
# people (known only from pretraining).
QA_SPLITS = ("finetuned_people", "validation_people", "heldout_people")

# Paths a user supplies. No stage depends on them directly: check_inputs (llmpipe.data.inputs) writes each one's
# fingerprint, which DVC hashes instead, and keeps md5s between runs in INPUT_HASHES.
USER_DATA = Path("user_data")
INPUTS = Path("data/inputs")
USER_DATA_FINGERPRINT = INPUTS / "user_data.json"
BASE_MODEL_FINGERPRINT = INPUTS / "base_model.json"
INPUT_HASHES = Path(".dvc/tmp/llmpipe-input-hashes.json")

PREPARED = Path("data/prepared")
PRETRAIN_TEXT = {split: PREPARED / f"pretrain_{split}.jsonl" for split in TEXT_SPLITS}
FINETUNE_EXAMPLES = {split: PREPARED / f"finetune_{split}.jsonl" for split in TEXT_SPLITS}
QA_FILES = {split: PREPARED / f"qa_{split}.jsonl" for split in QA_SPLITS}
PREPARED_SUMMARY = PREPARED / "summary.json"
WORLD = PREPARED / "world.json"

TOKENIZER = Path("models/tokenizer")
TOKENIZER_REPORT = Path("reports/tokenizer.md")
TOKENIZER_METRICS = Path("reports/tokenizer.json")
TOKENIZER_DETAILS = Path("reports/tokenizer_details.json")

TOKENS = Path("data/tokens")
TOKENS_META = TOKENS / "meta.json"


def token_shard(split: str, index: int) -> Path:
    """A split's index-th token shard, relative to TOKENS (as meta.json lists it)."""
    return Path(split) / f"shard-{index:05d}.bin"


PRETRAINED = Path("models/pretrained")
PRETRAIN_REPORTS = Path("reports/pretrain")
FINETUNED = Path("models/finetuned")
FINETUNE_REPORTS = Path("reports/finetune")
TRAIN_CURVE, EVAL_CURVE, METRICS, SAMPLES = "train_curve.csv", "eval_curve.csv", "metrics.json", "samples.md"
TIMINGS, DETAILS = "timings.json", "details.json"
# The values a stage used for params that are null in params.yaml (the tokenizer's vocabulary size, the fine-tuning
# method's learning rate): DVC restores them with the stage, so an execution that restored it logs them too.
EFFECTIVE_PARAMS = {"pretrain": PRETRAIN_REPORTS / "effective_params.json",
                    "finetune": FINETUNE_REPORTS / "effective_params.json"}

GGUF = Path("models/gguf")
HF_EXPORT = Path("models/hf")
QUANTIZE_REPORTS = Path("reports/quantize")
SIZES_JSON = QUANTIZE_REPORTS / "sizes.json"
SIZES_TABLE = QUANTIZE_REPORTS / "sizes.md"

EVALUATE_REPORTS = Path("reports/evaluate")
VARIANTS_TABLE = EVALUATE_REPORTS / "variants.csv"
EVALUATE_METRICS = EVALUATE_REPORTS / "metrics.json"
REPORT = Path("reports/report.md")
FIGURES = Path("reports/figures")


def gguf_file_name(model_name: str, variant: str) -> str:
    return f"{model_name}-{variant}.gguf"


def find_gguf_file(variant: str) -> Path | None:
    """The GGUF file of a variant (evaluate does not read quantize.model_name, so it matches the suffix)."""
    return next(iter(sorted(GGUF.glob(gguf_file_name("*", variant)))), None)


def repository_root() -> Path:
    """The user's repository: DVC_ROOT under DVC (also inside `dvc exp run --temp/--queue` copies), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def checkpoints_dir(stage: str, key: str) -> Path:
    """Resumable checkpoints of a stage run: outside the DVC outputs, shared by experiment copies."""
    return repository_root() / "checkpoints" / stage / key
