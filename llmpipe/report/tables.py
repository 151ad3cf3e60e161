"""The CSV and JSON files DVC reads as plots and metrics: training curves, final metrics, the
per-variant table of the evaluation. One number format for every CSV (6 significant digits).

A stage's metrics.json holds its headline metrics only, the ones DVC compares (`dvc exp show`,
`dvc metrics diff`); timings (machine noise) go to timings.json and every other number to details.json,
outputs DVC keeps but does not compare (llmpipe.pipeline.layout)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from llmpipe.pipeline import atomic, layout

VARIANT_COLUMNS = ["variant", "bits_per_weight", "file_bytes", "val_perplexity", "val_bpb", "qa_accuracy_finetuned_people",
                   "qa_accuracy_heldout_people", "kl_divergence", "tokens_per_second"]
# Headline metrics: the few numbers per stage DVC compares (llmpipe.sweep.summary summarises them over seeds too).
PRETRAIN_HEADLINE = ("val_bpb", "val_loss", "unigram_bpb")
FINETUNE_HEADLINE = ("qa_accuracy_finetuned_people", "qa_accuracy_validation_people", "qa_accuracy_heldout_people",
                     "val_answer_loss", "best_step")
# evaluate: per variant (the variants table has every measurement), and the F16 file's bits per byte.
VARIANT_HEADLINE = ("qa_accuracy_heldout_people",)
VARIANT_HEADLINE_F16 = ("val_bpb",)


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


def write_training_reports(directory: str | Path, history: dict[str, list[dict]], metrics: dict,
                           headline: tuple[str, ...], timings: dict | None = None) -> None:
    """Under `directory`: `train_curve.csv` (step, train_loss, learning_rate, ...), `eval_curve.csv` (step,
    validation metrics), the final `metrics` split into `metrics.json` (the `headline` keys) and
    `details.json` (the others), and `timings.json` when given."""
    directory = Path(directory)
    atomic.write_text(directory / layout.TRAIN_CURVE, csv_text(history["train"]) or "step,train_loss\n")
    atomic.write_text(directory / layout.EVAL_CURVE, csv_text(history["eval"]))
    atomic.write_json(directory / layout.METRICS, {k: v for k, v in metrics.items() if k in headline})
    atomic.write_json(directory / layout.DETAILS, {k: v for k, v in metrics.items() if k not in headline})
    if timings is not None:
        atomic.write_json(directory / layout.TIMINGS, timings)


def read_training_reports(directory: str | Path) -> dict:
    """metrics.json with timings.json and details.json merged in (those present): every final number of a stage."""
    merged = {}
    for name in (layout.METRICS, layout.TIMINGS, layout.DETAILS):
        path = Path(directory) / name
        if path.is_file():
            merged.update(json.loads(path.read_text("utf-8")))
    return merged


def variant_headline(rows: list[dict]) -> dict[str, dict]:
    """The evaluate stage's metrics.json: per variant, its headline metrics only."""
    headline = {}
    for row in rows:
        keys = VARIANT_HEADLINE + (VARIANT_HEADLINE_F16 if row["variant"] == "F16" else ())
        headline[row["variant"]] = {k: row[k] for k in keys if k in row}
    return headline


def write_variants_table(rows: list[dict], path: Path = layout.VARIANTS_TABLE) -> None:
    atomic.write_text(path, csv_text(rows, VARIANT_COLUMNS))
