"""Write a training run's curves and final metrics where DVC reads them (plots and metrics files)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from llmpipe import atomic
from llmpipe.training import TrainResult


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_training_reports(directory: str | Path, result: TrainResult, metrics: dict) -> None:
    """`train_curve.csv` (step, train_loss, learning_rate, ...), `eval_curve.csv` (step, validation
    metrics) and `metrics.json` (final metrics) under `directory`."""
    directory = Path(directory)
    atomic.write_text(directory / "train_curve.csv", _csv(result.history["train"]))
    atomic.write_text(directory / "eval_curve.csv", _csv(result.history["eval"]))
    atomic.write_json(directory / "metrics.json", metrics)
