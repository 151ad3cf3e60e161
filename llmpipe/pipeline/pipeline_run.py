"""The parent MLflow run of one pipeline execution (`dvc repro`, `dvc exp run`): what two executions are
compared by in the MLflow UI. It holds the whole composed configuration as params and each stage's headline
metrics (`pretrain.val_bpb`, `evaluate.Q4_0.qa_accuracy_heldout_people`, ...); its status spans its stages:
RUNNING while one runs, FAILED as soon as one fails."""

from __future__ import annotations

import os
import time
from typing import Any

KIND_TAG, KEY_TAG = "llmpipe.kind", "llmpipe.pipeline"


def log_params(client, run_id: str, values: dict[str, Any]) -> None:
    """Params in batches of 100 (MLflow's limit per call), values cut to MLflow's 6,000 characters."""
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in sorted(values.items())]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])


def pipeline_parent(client, experiment_id: str, key: str | None, params: dict[str, Any]) -> str | None:
    """The run id of the pipeline execution `key` (created with `params` the first time, set RUNNING again
    for each later stage unless it failed), or None for a stage run by hand."""
    if not key:
        return None
    found = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and "
                                                              f"tags.`{KIND_TAG}` = 'pipeline'", max_results=1)
    if found:
        parent_id = found[0].info.run_id
        if found[0].info.status != "FAILED":
            client.update_run(parent_id, status="RUNNING")
        return parent_id
    label = os.environ.get("DVC_EXP_NAME") or "dvc repro"
    tags = {KEY_TAG: key, KIND_TAG: "pipeline"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    parent = client.create_run(experiment_id, run_name=f"pipeline {label} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                               tags=tags)  # RUNNING
    log_params(client, parent.info.run_id, params)
    return parent.info.run_id


def end_stage(client, parent_id: str, status: str) -> None:
    """The pipeline run's end is its last stage's end; once a stage failed, the pipeline failed."""
    parent = client.get_run(parent_id)
    client.set_terminated(parent_id, "FAILED" if parent.info.status == "FAILED" else status)
