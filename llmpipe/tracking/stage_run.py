"""The MLflow run of one stage execution (`StageRun`), a child of its pipeline execution's run
(llmpipe.tracking.pipeline_run). It carries the stage's declared params, metrics (step metrics batched),
small artifacts, the data and models it read as MLflow datasets (path and md5), system metrics while it
runs, and tags (llmpipe.tracking.provenance.stage_tags, and the process: llmpipe.tracking.orphans, which closes
the runs of killed processes when a stage starts). Where runs are stored: llmpipe.tracking.store.

A tracking server that goes away while the stage works (stopped, restarted, its machine gone) does not stop the
stage: once a call fails and the server does not answer, the run logs nothing more, the stage writes its outputs,
and it ends with one line saying its run could not be closed (the server's runs are what the stage logged up to
then; the next stage to start on this machine marks the run FAILED, llmpipe.tracking.orphans). MLflow's client
retries each call first (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT): a server back within
that time loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmpipe.errors import Stopped
from llmpipe.tracking import store
from llmpipe.tracking.orphans import close_orphaned_runs, process_tags
from llmpipe.tracking.pipeline_run import (
    KEY_TAG,
    end_stage,
    log_effective_params,
    log_params,
    pipeline_parent,
)
from llmpipe.tracking.provenance import stage_tags

NOT_A_STAGE_DEPENDENCY = "MLflow runs"  # see llmpipe.generate.code_deps

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
        self.defaulted: dict[str, Any] = {}  # params null in params.yaml → the value the stage used
        self.lost: str | None = None  # why the tracking server stopped answering mid-stage: nothing more is logged
        self._pending: list = []
        self._client = None
        self._monitor = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "StageRun":
        if not self.enabled:
            return self
        self._client, experiment_id = store.connect()
        close_orphaned_runs(self._client, experiment_id, self.stage)
        tags = {**stage_tags(self.stage, self.input_hashes), **process_tags()}
        self.parent_id = pipeline_parent(self._client, experiment_id, tags.get(KEY_TAG), self.pipeline_params)
        run = self._client.create_run(experiment_id, run_name=self.stage, tags={
            **tags, **({"mlflow.parentRunId": self.parent_id} if self.parent_id else {})})
        self.run_id = run.info.run_id
        try:
            log_params(self._client, self.run_id, self.params)
            log_inputs(self._client, self.run_id, self.stage, self.input_hashes)
            self._monitor = start_system_metrics(self.run_id)
        except BaseException as exc:  # the run exists: end it (FAILED, or KILLED by a signal) before unwinding
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled or self.run_id is None:
            return
        status = ("FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, (KeyboardInterrupt, Stopped))
                  else "FAILED")
        try:
            self.flush()
            if self._monitor is not None:
                stop_system_metrics(self._monitor, wait=self.lost is None)
            self._track(self._client.set_terminated, self.run_id, status)
            if self.parent_id:
                self._track(end_stage, self._client, self.parent_id, status, self.stage)
        except Exception:
            if exc_type is None:
                raise
            # Ending the run is best effort when the stage already failed (the store may be what failed): the
            # stage's own error is the one to report.
        if self.lost is not None and exc_type is None:
            print(f"warning: {self.stage}: outputs written, but its MLflow run {self.run_id} could not be closed: "
                  f"{self.lost}", file=sys.stderr, flush=True)

    def _track(self, call, *args, **kwargs) -> Any:
        """`call(*args, **kwargs)` to the tracking store, unless the server went away during the stage: then
        nothing (and `lost` says why). An error from a server that answers is raised."""
        if self.lost is not None:
            return None
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            gone = store.server_gone(exc)
            if gone is None:
                raise
            self.lost = gone
            return None

    # -- logging -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record metrics (at `step` for curves); batched, flushed every few hundred points."""
        if not self.enabled:
            return
        from mlflow.entities import (
            Metric,  # deferred: mlflow takes ~1.2 s (store.connect)
        )

        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending.append(Metric(key, float(value), timestamp, step or 0))
        if len(self._pending) >= _FLUSH_EVERY:
            self.flush()

    def log_facts(self, facts: dict[str, Any]) -> None:
        """Single values that describe the run (parameter count, steps, precision): params, not one-point metrics
        (which MLflow draws as bar charts)."""
        if self.enabled:
            self._track(log_params, self._client, self.run_id, facts)

    def log_effective_params(self, values: dict[str, Any]) -> None:
        """The values the stage used for params left null in params.yaml (e.g. `finetune.learning_rate`: the
        method's rate), by dotted key: params of this run and of the pipeline run, which compare by them; kept in
        `defaulted`, which the stage runner writes to the stage's layout.EFFECTIVE_PARAMS output."""
        defaulted = {key: value for key, value in values.items()
                     if key in self.params and self.params[key] is None and value is not None}
        self.defaulted.update(defaulted)
        if not self.enabled or not defaulted:
            return
        self._track(log_params, self._client, self.run_id, defaulted)
        if self.parent_id:
            self._track(log_effective_params, self._client, self.parent_id, defaulted)

    def flush(self) -> None:
        if self.enabled and self._pending:
            for start in range(0, len(self._pending), 1000):
                self._track(self._client.log_batch, self.run_id, metrics=self._pending[start:start + 1000])
            self._pending = []

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self._track(self._client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        path = Path(path)
        log = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        self._track(log, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._track(self._client.log_text, self.run_id, text, artifact_file)


def log_inputs(client, run_id: str, stage: str, hashes: dict[str, str]) -> None:
    """The data and models a stage read, as MLflow datasets: path and DVC's md5 (code files are tags only)."""
    from mlflow.entities import (  # deferred: mlflow takes ~1.2 s (store.connect)
        Dataset,
        DatasetInput,
        InputTag,
    )

    inputs = [DatasetInput(Dataset(name=path, digest=digest[:32], source_type="local",
                                   source=json.dumps({"uri": path})),
                           tags=[InputTag("mlflow.data.context", stage)])
              for path, digest in sorted(hashes.items()) if not path.endswith(".py")]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def start_system_metrics(run_id: str):
    """CPU, memory (and GPU where there is one) every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) while the
    stage runs, as MLflow's `system/*` metrics; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false switches them off."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() in ("false", "0"):
        return None
    # deferred: mlflow takes ~1.2 s (store.connect)
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, tracking_uri=store.tracking_uri(), sampling_interval=float(
        os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 10)))
    monitor.start()
    return monitor


def stop_system_metrics(monitor, wait: bool) -> None:
    """Stop the sampling; `wait=False` (the server went away) leaves the last samples unsent rather than wait for
    MLflow's retries."""
    if wait:
        monitor.finish()
    else:
        # its thread may be in a request that fails later: the stage's own line about the lost server says it
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        monitor._shutdown_event.set()  # MLflow 3.17's monitor has no public way to stop without flushing
