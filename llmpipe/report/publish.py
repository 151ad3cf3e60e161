"""Publish a training stage's results: the report files DVC tracks and the same numbers in MLflow."""

from __future__ import annotations

import sys
from collections.abc import Collection
from pathlib import Path

from llmpipe.report.tables import CHANCE_METRIC, write_training_reports
from llmpipe.tracking.stage_run import StageRun


def publish_training(run: StageRun, directory: Path, history: dict[str, list[dict]], metrics: dict,
                     dvc_names: dict[str, str], *, facts: dict | None = None, timings: dict | None = None,
                     in_curves: Collection[str] = ()) -> None:
    """Write `directory`'s curves, metrics.json (the DVC metrics `dvc_names`: short → full name), details.json
    (every number) and timings.json; log to the stage's MLflow run the `facts` as params and every other number
    as a metric (but those already logged as the curves' last point, `in_curves`); the report files as
    artifacts under `reports/`. (The pipeline run reads metrics.json itself when the stage ends.)"""
    write_training_reports(directory, history, metrics, dvc_names, timings)
    facts = facts or {}
    run.log_facts(facts)
    numbers = {**metrics, **(timings or {})}
    run.log_metrics({k: v for k, v in numbers.items() if k not in facts and k not in in_curves})
    run.log_artifact(directory, "reports")


CHANCE_TAG = "llmpipe.no_better_than_chance"


def flag_chance_level(run: StageRun, warning: str | None) -> dict[str, float]:
    """A model no better than chance (`warning`, from llmpipe.train.loop.chance_level_warning) is recorded, not
    refused: a `warning: ` line, the MLflow tag CHANCE_TAG on the stage's run, and the metric CHANCE_METRIC = 1 that
    this returns for the stage's metrics (metrics.json, so `dvc exp show` and the pipeline run show it); {} when
    the model learned."""
    if warning is None:
        return {}
    print(f"warning: {warning}; recorded ({CHANCE_METRIC} = 1 in the metrics)", file=sys.stderr, flush=True)
    run.set_tags({CHANCE_TAG: warning[:5000]})
    return {CHANCE_METRIC: 1.0}
