"""The CSV and JSON files DVC reads as plots and metrics: training curves, final metrics, the
per-variant table of the evaluation. One number format for every CSV (6 significant digits).

A stage's metrics.json holds its headline metrics only, the ones DVC compares (`dvc exp show`,
`dvc metrics diff`), under short names (the *_METRICS maps below), so that `dvc exp show --only-changed`
after a one-param fine-tuning experiment fits 120 columns. details.json holds every final number under its
full name (as the stage's MLflow run logs it) and timings.json the machine noise: outputs DVC caches but
does not compare (llmpipe.config.layout)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from llmpipe import atomic
from llmpipe.config import layout

VARIANT_COLUMNS = ["variant", "bits_per_weight", "file_bytes", "val_perplexity", "val_bpb", "qa_accuracy_finetuned_people",
                   "qa_accuracy_heldout_people", "kl_divergence", "tokens_per_second"]
# The metrics DVC compares, by stage: short name in metrics.json → full name (details.json, MLflow).
TOKENIZER_METRICS = {"chars_per_token": "validation_characters_per_token"}
# A training stage whose model ends no better than chance has CHANCE_METRIC = 1 (the others do not have it).
CHANCE_METRIC = "no_better_than_chance"
PRETRAIN_METRICS = {"val_bpb": "val_bpb", CHANCE_METRIC: CHANCE_METRIC}
FINETUNE_METRICS = {"heldout_acc": "qa_accuracy_heldout_people", "tuned_acc": "qa_accuracy_finetuned_people",
                    CHANCE_METRIC: CHANCE_METRIC}
# evaluate: the held-out people's accuracy of llama.cpp's usual 4-bit file and of the smallest one, keyed by
# variant (every variant's every number is in variants.csv, the plot data, and in MLflow).
EVALUATE_VARIANTS = ("Q4_K", "Q2_K")
HELDOUT_ACCURACY = FINETUNE_METRICS["heldout_acc"]


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as CSV text; columns in first-seen order unless given (then other keys are left out)."""
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def read_curve(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def dvc_metrics(values: dict, names: dict[str, str]) -> dict:
    """The DVC metrics among `values` (full names), under their short `names`."""
    return {short: values[full] for short, full in names.items() if full in values}


def write_training_reports(directory: str | Path, history: dict[str, list[dict]], metrics: dict,
                           names: dict[str, str], timings: dict | None = None) -> None:
    """Under `directory`: `train_curve.csv` (step, train_loss, learning_rate, ...), `eval_curve.csv` (step,
    validation metrics), `metrics.json` (the DVC metrics: `names`, short → full), `details.json` (every final
    number of `metrics`), and `timings.json` when given."""
    directory = Path(directory)
    atomic.write_text(directory / layout.TRAIN_CURVE, csv_text(history["train"]) or "step,train_loss\n")
    atomic.write_text(directory / layout.EVAL_CURVE, csv_text(history["eval"]))
    atomic.write_json(directory / layout.METRICS, dvc_metrics(metrics, names))
    atomic.write_json(directory / layout.DETAILS, metrics)
    if timings is not None:
        atomic.write_json(directory / layout.TIMINGS, timings)


def read_training_reports(directory: str | Path) -> dict:
    """details.json with timings.json merged in (those present): every final number of a stage, full names."""
    merged = {}
    for name in (layout.TIMINGS, layout.DETAILS):
        path = Path(directory) / name
        if path.is_file():
            merged.update(json.loads(path.read_text("utf-8")))
    return merged


def evaluate_metrics(rows: list[dict]) -> dict[str, float]:
    """The evaluate stage's metrics.json: the held-out people's accuracy of the EVALUATE_VARIANTS written."""
    return {row["variant"]: row[HELDOUT_ACCURACY] for row in rows
            if row["variant"] in EVALUATE_VARIANTS and HELDOUT_ACCURACY in row}


def write_variants_table(rows: list[dict], path: Path = layout.VARIANTS_TABLE) -> None:
    atomic.write_text(path, csv_text(rows, VARIANT_COLUMNS))
