"""The CSV and JSON files DVC reads as plots and metrics: training curves, final metrics, the
per-variant table of the evaluation. One number format for every CSV (6 significant digits)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from llmpipe.pipeline import atomic, layout

VARIANT_COLUMNS = ["variant", "bits_per_weight", "file_bytes", "val_perplexity", "val_bpb", "qa_accuracy_finetuned_people",
                   "qa_accuracy_heldout_people", "kl_divergence", "tokens_per_second"]


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


def write_training_reports(directory: str | Path, history: dict[str, list[dict]], metrics: dict) -> None:
    """`train_curve.csv` (step, train_loss, learning_rate, ...), `eval_curve.csv` (step, validation
    metrics) and `metrics.json` (final metrics) under `directory`."""
    directory = Path(directory)
    atomic.write_text(directory / layout.TRAIN_CURVE, csv_text(history["train"]) or "step,train_loss\n")
    atomic.write_text(directory / layout.EVAL_CURVE, csv_text(history["eval"]))
    atomic.write_json(directory / layout.METRICS, metrics)


def write_variants_table(rows: list[dict], path: Path = layout.VARIANTS_TABLE) -> None:
    atomic.write_text(path, csv_text(rows, VARIANT_COLUMNS))
