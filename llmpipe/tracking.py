"""MLflow tracking: one run per executed stage, grouped under one parent run per pipeline execution.

Where runs go:
- `MLFLOW_TRACKING_URI` if set (a shared `mlflow server`, or any store MLflow accepts);
- otherwise a SQLite database at `<repo>/.mlflow/mlflow.db` with artifacts in `<repo>/.mlflow/artifacts`,
  an absolute path. `<repo>` is `DVC_ROOT`, which DVC points at the user's repository even when an
  experiment runs in a temporary copy (`dvc exp run --temp` / `--queue`), so those runs are kept.

Each stage run carries: the stage's declared params, metrics (step metrics batched), small artifacts,
and tags: git commit, DVC stage, DVC experiment name and baseline, md5 of each input (dependency)
and the pipeline execution it belongs to (`llmpipe.pipeline`), which is also its parent run.

Open the UI:  mlflow ui --backend-store-uri sqlite:///$PWD/.mlflow/mlflow.db
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from llmpipe.errors import PipelineError

EXPERIMENT_NAME_DEFAULT = "llmpipe"
_FLUSH_EVERY = 500
_SERVER_TIMEOUT_SECONDS = 5


def repository_root() -> Path:
    """The user's repository: DVC_ROOT under DVC (also inside experiment temp copies), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def local_store_dir() -> Path:
    return repository_root() / ".mlflow"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def check_server_answers(uri: str) -> None:
    """Fail fast, before any work, when a configured tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_SERVER_TIMEOUT_SECONDS):
            pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineError(
            f"MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) did not answer: {reason}"
        ) from None


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_hashes(paths: list[str]) -> dict[str, str]:
    """md5 of each dependency: a file's content, or for a directory its sorted (path, md5) listing."""
    hashes = {}
    for name in paths:
        path = Path(name)
        if path.is_file():
            hashes[name] = file_md5(path)
        elif path.is_dir():
            listing = hashlib.md5()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                listing.update(f"{file.relative_to(path).as_posix()} {file_md5(file)}\n".encode())
            hashes[name] = listing.hexdigest()
    return hashes


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def pipeline_execution_key() -> str | None:
    """An id shared by all stages of one `dvc repro` / `dvc exp run`, or None for a stage run by hand.

    `LLMPIPE_PIPELINE_ID` wins; an experiment is identified by its name; a plain `dvc repro`
    by the DVC process that runs the stages (pid and start time of the ancestor `dvc` process).
    """
    if os.environ.get("LLMPIPE_PIPELINE_ID"):
        return os.environ["LLMPIPE_PIPELINE_ID"]
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp:{os.environ['DVC_EXP_NAME']}:{os.environ.get('DVC_EXP_BASELINE_REV', '')}"
    try:
        import psutil

        process = psutil.Process().parent()
        while process is not None:
            argv = process.cmdline()
            if any(Path(arg).name in ("dvc", "dvc.exe") or arg == "dvc" for arg in argv[:3]):
                return f"dvc:{process.pid}:{process.create_time():.3f}"
            process = process.parent()
    except Exception:  # process table not readable: run without a parent
        return None
    return None


def torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


class StageRun:
    """The MLflow run of one stage execution. Use as a context manager; a no-op when `enabled=False`
    (e.g. on DDP ranks other than 0)."""

    def __init__(self, stage: str, params: dict[str, Any], input_hashes: dict[str, str], enabled: bool = True):
        self.stage = stage
        self.params = params
        self.input_hashes = input_hashes  # md5 of each dependency, by path
        self.enabled = enabled
        self.run_id: str | None = None
        self._pending: list = []
        self._client = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "StageRun":
        if not self.enabled:
            return self
        uri = tracking_uri()
        # Decided before mlflow.set_tracking_uri, which exports MLFLOW_TRACKING_URI itself.
        local_store = not os.environ.get("MLFLOW_TRACKING_URI")
        check_server_answers(uri)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        import mlflow
        from mlflow.tracking import MlflowClient

        if local_store:
            local_store_dir().mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        self._client = MlflowClient(uri)
        experiment_id = self._experiment_id(local_store)
        tags = self._tags()
        parent_id = self._pipeline_parent(experiment_id, tags.get("llmpipe.pipeline"))
        run = self._client.create_run(experiment_id, run_name=self.stage, tags={
            **tags, **({"mlflow.parentRunId": parent_id} if parent_id else {})})
        self.run_id = run.info.run_id
        self._log_params()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled or self.run_id is None:
            return
        self.flush()
        self._client.set_terminated(self.run_id, "FINISHED" if exc_type is None else "FAILED")

    def _experiment_id(self, local_store: bool) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME_DEFAULT)
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # In our local store, artifacts go next to the database (MLflow's default is ./mlruns of the
        # working directory, which for `dvc exp run --temp` is a temporary copy).
        artifact_location = (local_store_dir() / "artifacts").as_uri() if local_store else None
        try:
            return self._client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # created concurrently by a parallel stage
            return self._client.get_experiment_by_name(name).experiment_id

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
            return found[0].info.run_id
        label = os.environ.get("DVC_EXP_NAME") or "dvc repro"
        name = f"pipeline {label} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = {"llmpipe.pipeline": key, "llmpipe.kind": "pipeline"}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
        parent = self._client.create_run(experiment_id, run_name=name, tags=tags)
        self._client.set_terminated(parent.info.run_id, "FINISHED")
        return parent.info.run_id

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(self.params.items())]
        for start in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[start:start + 100])

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

    def log_chat_model(self, model_dir: str | Path, tokenizer_dir: str | Path, registered_name: str) -> str | None:
        """Log the model as an MLflow pyfunc model defined from code (llmpipe/serving.py: nothing
        pickled), with its safetensors weights and tokenizer as artifacts, and register it.
        Returns the registered version."""
        if not self.enabled:
            return None
        import mlflow

        import llmpipe
        from llmpipe import serving

        package_dir = Path(llmpipe.__file__).parent
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pyfunc.log_model(
                name="chat_model", python_model=serving.__file__, code_paths=[str(package_dir)],
                artifacts={"model": str(model_dir), "tokenizer": str(tokenizer_dir)},
                pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch_version()}",
                                  "tokenizers==0.23.3", "safetensors==0.8.0", "numpy==2.4.6"],
                registered_model_name=registered_name,
            )
        return str(info.registered_model_version) if info.registered_model_version else None

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)
