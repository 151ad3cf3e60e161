"""The MLflow run of one stage execution (`StageRun`), grouped under one parent run per pipeline execution.

Each stage run carries: the stage's declared params, metrics (step metrics batched), small artifacts,
the data and models it read as MLflow datasets (path and md5), system metrics (CPU, memory) while it runs,
and tags: git commit, DVC stage, DVC experiment name and baseline, md5 of each input (dependency)
and the pipeline execution it belongs to (`llmpipe.pipeline`), which is also its parent run.

The parent "pipeline" run is what two executions are compared by in the MLflow UI: it holds the whole
composed configuration as params, each stage's headline metrics (`pretrain.val_bpb`,
`finetune.qa_accuracy_heldout_people`, `evaluate.Q4_0.qa_accuracy_heldout_people`, ...), and a status and
duration that span its stages: RUNNING while a stage runs, FAILED as soon as one fails.
Where runs are stored: llmpipe.pipeline.store; where a run came from: llmpipe.pipeline.provenance.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llmpipe.pipeline import store
from llmpipe.pipeline.provenance import git_commit, pipeline_execution_key

_FLUSH_EVERY = 500


class StageRun:
    """The MLflow run of one stage execution. Use as a context manager; a no-op when `enabled=False`
    (e.g. on DDP ranks other than 0)."""

    def __init__(self, stage: str, params: dict[str, Any], input_hashes: dict[str, str], enabled: bool = True,
                 pipeline_params: dict[str, Any] | None = None):
        self.stage = stage
        self.params = params
        self.pipeline_params = pipeline_params or {}  # the whole configuration, flattened: the parent's params
        self.input_hashes = input_hashes  # md5 of each dependency, by path
        self.enabled = enabled
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self._pending: list = []
        self._client = None
        self._monitor = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "StageRun":
        if not self.enabled:
            return self
        self._client, experiment_id = store.connect()
        tags = self._tags()
        self.parent_id = self._pipeline_parent(experiment_id, tags.get("llmpipe.pipeline"))
        run = self._client.create_run(experiment_id, run_name=self.stage, tags={
            **tags, **({"mlflow.parentRunId": self.parent_id} if self.parent_id else {})})
        self.run_id = run.info.run_id
        self._log_params(self.run_id, self.params)
        self._log_inputs()
        self._monitor = self._start_system_metrics()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled or self.run_id is None:
            return
        if self._monitor is not None:
            self._monitor.finish()
        self.flush()
        status = "FINISHED" if exc_type is None else "FAILED"
        self._client.set_terminated(self.run_id, status)
        if self.parent_id:  # its end is this stage's end; once a stage failed, the pipeline failed
            parent = self._client.get_run(self.parent_id)
            self._client.set_terminated(self.parent_id, "FAILED" if parent.info.status == "FAILED" else status)

    def _log_inputs(self) -> None:
        """The data and models the stage read, as MLflow datasets: path and DVC's md5 (code files are tags only)."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=path, digest=digest[:32], source_type="local",
                                       source=json.dumps({"uri": path})),
                               tags=[InputTag("mlflow.data.context", self.stage)])
                  for path, digest in sorted(self.input_hashes.items()) if not path.endswith(".py")]
        if inputs:
            self._client.log_inputs(self.run_id, datasets=inputs)

    def _start_system_metrics(self):
        """CPU, memory (and GPU where there is one) every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) while
        the stage runs, as MLflow's `system/*` metrics; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false switches them off."""
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() in ("false", "0"):
            return None
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(self.run_id, tracking_uri=store.tracking_uri(), sampling_interval=float(
            os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 10)))
        monitor.start()
        return monitor

    def _tags(self) -> dict[str, str]:
        tags = {"dvc.stage": self.stage, "llmpipe.kind": "stage"}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
        key = pipeline_execution_key()
        if key:
            tags["llmpipe.pipeline"] = key
        for path, digest in self.input_hashes.items():
            tags[f"input.md5.{path}"] = digest
        return tags

    def _pipeline_parent(self, experiment_id: str, key: str | None) -> str | None:
        if not key:
            return None
        found = self._client.search_runs(
            [experiment_id],
            filter_string=f"tags.`llmpipe.pipeline` = '{key}' and tags.`llmpipe.kind` = 'pipeline'",
            max_results=1,
        )
        if found:
            parent_id = found[0].info.run_id
            if found[0].info.status != "FAILED":
                self._client.update_run(parent_id, status="RUNNING")
            return parent_id
        label = os.environ.get("DVC_EXP_NAME") or "dvc repro"
        name = f"pipeline {label} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = {"llmpipe.pipeline": key, "llmpipe.kind": "pipeline"}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
        parent = self._client.create_run(experiment_id, run_name=name, tags=tags)  # RUNNING
        self._log_params(parent.info.run_id, self.pipeline_params)
        return parent.info.run_id

    def _log_params(self, run_id: str, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(values.items())]
        for start in range(0, len(params), 100):
            self._client.log_batch(run_id, params=params[start:start + 100])

    # -- logging -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record metrics (at `step` for curves); batched, flushed every few hundred points."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending.append(Metric(key, float(value), timestamp, step or 0))
        if len(self._pending) >= _FLUSH_EVERY:
            self.flush()

    def log_facts(self, facts: dict[str, Any]) -> None:
        """Single values that describe the run (parameter count, steps, precision): params, not one-point metrics
        (which MLflow draws as bar charts)."""
        if self.enabled:
            self._log_params(self.run_id, facts)

    def log_headline(self, metrics: dict[str, float]) -> None:
        """Final metrics worth comparing pipelines by (already in this run): into the parent, as `<stage>.<name>`."""
        if self.enabled and self.parent_id:
            from mlflow.entities import Metric

            timestamp = int(time.time() * 1000)
            self._client.log_batch(self.parent_id, metrics=[
                Metric(f"{self.stage}.{key}", float(value), timestamp, 0) for key, value in metrics.items()])

    def flush(self) -> None:
        if self.enabled and self._pending:
            for start in range(0, len(self._pending), 1000):
                self._client.log_batch(self.run_id, metrics=self._pending[start:start + 1000])
            self._pending = []

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)
