"""The parent MLflow run of one pipeline execution (`dvc repro`, `dvc exp run`): what two executions are
compared by in the MLflow UI, like for like. Every execution logs one, whether its stages ran or DVC restored them
(unchanged, or from the run-cache: `dvc repro --pull`, a pushed experiment "cached - skipping run"):

- params: the whole effective configuration: every key of params.yaml, a null one with the value the stage that
  reads it used (e.g. `finetune.learning_rate`: the method's rate; tag `llmpipe.params_defaulted` names them),
  read from that stage's output layout.EFFECTIVE_PARAMS, which DVC restores with the stage; a null no stage
  resolves (`base_model.path` when training from scratch) is logged as `null`;
- metrics: every stage's DVC metrics as `<stage>.<key>` (`pretrain.val_bpb`, `finetune.heldout_acc`, ...),
  read from the metrics files of dvc.yaml, so a stage DVC did not run still contributes the numbers of the
  outputs the execution ends with;
- tags: the git commit, `llmpipe.stages_ran` and `llmpipe.stages_cached` (dvc.yaml order);
- status: RUNNING while a stage runs, FAILED as soon as one fails (also when its stage's process was killed:
  llmpipe.tracking.orphans closes it when the next stage starts).

The first stage that runs creates it (`pipeline_parent`) and each stage's end updates it (`end_stage`); the
`log_pipeline` stage, which DVC runs last in every execution of the whole pipeline (`always_changed`), completes
it (`record_execution`), creating it when no stage ran. A `dvc repro <stage>` that stops before it has the
stages' part only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from llmpipe.config.layout import EFFECTIVE_PARAMS
from llmpipe.config.params import flatten
from llmpipe.tracking.orphans import process_tags, set_process_tags
from llmpipe.tracking.provenance import git_commit

NOT_A_STAGE_DEPENDENCY = "the pipeline execution's MLflow run"  # see llmpipe.generate.code_deps

KIND_TAG, KEY_TAG = "llmpipe.kind", "llmpipe.pipeline"
RAN_TAG, CACHED_TAG, DEFAULTED_TAG = "llmpipe.stages_ran", "llmpipe.stages_cached", "llmpipe.params_defaulted"


def log_params(client, run_id: str, values: dict[str, Any]) -> None:
    """Params in batches of 100 (MLflow's limit per call), values cut to MLflow's 6,000 characters. Null values
    are left out: MLflow would store the string "None" (a categorical axis where the others are numbers)."""
    from mlflow.entities import Param  # deferred: mlflow takes ~1.2 s (store.connect)

    params = [Param(k, str(v)[:6000]) for k, v in sorted(values.items()) if v is not None]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])


def pipeline_parent(client, experiment_id: str, key: str | None, params: dict[str, Any]) -> str | None:
    """The run id of the pipeline execution `key` (created with `params` the first time, set RUNNING again
    for each later stage), or None for a stage run by hand. The stage's process is recorded on it
    (llmpipe.tracking.orphans) before it is RUNNING. A pipeline run that failed or was killed is over (DVC stops
    at the first failure): the same key again (an experiment name rerun) is a new execution, with a new run."""
    if not key:
        return None
    found = current_execution(client, experiment_id, key)
    if found is not None:
        parent_id = found.info.run_id
        set_process_tags(client, parent_id)
        client.update_run(parent_id, status="RUNNING")
        return parent_id
    return create_pipeline_run(client, experiment_id, key, params)


def current_execution(client, experiment_id: str, key: str):
    """The pipeline run of execution `key`, or None when there is none, or its last one failed or was killed."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and "
                                                              f"tags.`{KIND_TAG}` = 'pipeline'", max_results=1)
    return found[0] if found and found[0].info.status not in ("FAILED", "KILLED") else None


def create_pipeline_run(client, experiment_id: str, key: str, params: dict[str, Any]) -> str:
    """A new RUNNING pipeline run for execution `key`, tagged with this process, the command and the commit."""
    command = "dvc exp run" if os.environ.get("DVC_EXP_NAME") else "dvc repro"
    label = os.environ.get("DVC_EXP_NAME") or "dvc repro"
    tags = {KEY_TAG: key, KIND_TAG: "pipeline", "mlflow.source.name": command, "mlflow.source.type": "LOCAL",
            **process_tags()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    parent = client.create_run(experiment_id, run_name=f"pipeline {label} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                               tags=tags)  # RUNNING
    log_params(client, parent.info.run_id, params)
    return parent.info.run_id


def stage_metric_files(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[Path]]:
    """Every stage of dvc.yaml that opens an MLflow run, in its order, with the files it declares under `metrics:`
    (not check_inputs, which DVC runs every time: `always_changed`)."""
    stages = (yaml.safe_load(Path(dvc_yaml).read_text("utf-8")) or {}).get("stages") or {}
    return {name: [Path(next(iter(entry)) if isinstance(entry, dict) else entry)
                   for entry in (definition or {}).get("metrics") or []]
            for name, definition in stages.items() if not (definition or {}).get("always_changed")}


def workspace_metrics(files: dict[str, list[Path]]) -> dict[str, float]:
    """The numbers in the stages' metrics files as they are now, as `<stage>.<key>`; missing files are skipped."""
    values = {}
    for stage, paths in files.items():
        for path in paths:
            try:
                content = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError):
                continue
            values.update({key: float(value) for key, value in flatten(content, stage).items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)})
    return values


def end_stage(client, parent_id: str, status: str, stage: str | None = None) -> None:
    """The pipeline run's end is its last stage's end; once a stage failed, the pipeline failed. A stage that
    finished adds itself to the stages that ran and puts every stage's current DVC metrics on the run."""
    parent = client.get_run(parent_id)
    if status == "FINISHED" and stage and Path("dvc.yaml").is_file():
        log_outcome(client, parent_id, tag_values(parent, RAN_TAG) | {stage})
    client.set_terminated(parent_id, "FAILED" if parent.info.status == "FAILED" else status)


def tag_values(run, tag: str) -> set[str]:
    """The comma-separated values of a run's tag (none for no run)."""
    return set(filter(None, run.data.tags.get(tag, "").split(","))) if run is not None else set()


def log_outcome(client, parent_id: str, ran: set[str]) -> None:
    """The stages that ran and those DVC did not run (dvc.yaml order), and every stage's current DVC metrics."""
    from mlflow.entities import Metric  # deferred: mlflow takes ~1.2 s (store.connect)

    files = stage_metric_files()
    client.set_tag(parent_id, RAN_TAG, ",".join(name for name in files if name in ran))
    client.set_tag(parent_id, CACHED_TAG, ",".join(name for name in files if name not in ran))
    timestamp = int(time.time() * 1000)
    metrics = [Metric(key, value, timestamp, 0) for key, value in sorted(workspace_metrics(files).items())]
    for start in range(0, len(metrics), 1000):
        client.log_batch(parent_id, metrics=metrics[start:start + 1000])


def effective_configuration(params: dict[str, Any],
                            recorded: Iterable[Path] = EFFECTIVE_PARAMS.values()) -> tuple[dict[str, Any], set[str]]:
    """`params` (flattened params.yaml) with each null that a stage resolved replaced by the value it used (from
    the stages' EFFECTIVE_PARAMS outputs, as the execution ends with them; a missing one is skipped), and the keys
    so replaced."""
    values, defaulted = dict(params), set()
    for path in recorded:
        try:
            used = json.loads(Path(path).read_text("utf-8"))
        except (OSError, ValueError):
            continue
        for key, value in (used if isinstance(used, dict) else {}).items():
            if key in values and values[key] is None and value is not None:
                values[key] = value
                defaulted.add(key)
    return values, defaulted


def record_execution(client, experiment_id: str, key: str, params: dict[str, Any]) -> str:
    """Complete the pipeline run of execution `key` (create it when no stage ran: every stage restored or up to
    date) from the outputs the execution ends with: every param of `params` (flattened params.yaml) that it lacks,
    nulls resolved as the stages resolved them, every stage's DVC metrics, the stages that ran and did not; then
    end it. Returns its id."""
    found = current_execution(client, experiment_id, key)
    parent_id = found.info.run_id if found is not None else create_pipeline_run(client, experiment_id, key, {})
    logged = found.data.params if found is not None else {}
    values, defaulted = effective_configuration(params)
    log_params(client, parent_id, {name: "null" if value is None else value for name, value in values.items()
                                   if name not in logged})
    if defaulted:
        client.set_tag(parent_id, DEFAULTED_TAG, ",".join(sorted(tag_values(found, DEFAULTED_TAG) | defaulted)))
    log_outcome(client, parent_id, tag_values(found, RAN_TAG))
    client.set_terminated(parent_id, "FINISHED")
    return parent_id


def log_effective_params(client, parent_id: str, values: dict[str, Any]) -> None:
    """Params that were null in params.yaml, with the value a stage used: onto the pipeline run, named in its
    DEFAULTED_TAG. A pipeline run that has a different value already (an experiment name reused) keeps it."""
    from mlflow.exceptions import (
        MlflowException,  # deferred: mlflow takes ~1.2 s (store.connect)
    )

    try:
        log_params(client, parent_id, values)
    except MlflowException as exc:
        print(f"MLflow: pipeline run {parent_id} keeps its earlier values of {', '.join(values)} ({exc.message[:200]})",
              flush=True)
        return
    defaulted = set(filter(None, client.get_run(parent_id).data.tags.get(DEFAULTED_TAG, "").split(",")))
    client.set_tag(parent_id, DEFAULTED_TAG, ",".join(sorted(defaulted | set(values))))
