"""Where MLflow runs are stored.

- `MLFLOW_TRACKING_URI` if set (a shared `mlflow server`, or any store MLflow accepts); a server that
  does not answer fails the stage before any work, naming the address;
- otherwise a SQLite database at `<repo>/.mlflow/mlflow.db` with artifacts in `<repo>/.mlflow/artifacts`,
  an absolute path. `<repo>` is DVC_ROOT, which DVC points at the user's repository even when an
  experiment runs in a temporary copy (`dvc exp run --temp` / `--queue`), so those runs are kept.

Open the UI:  mlflow ui --backend-store-uri sqlite:///$PWD/.mlflow/mlflow.db
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llmpipe.pipeline.errors import PipelineError
from llmpipe.pipeline.layout import repository_root

EXPERIMENT_NAME_DEFAULT = "llmpipe"
_SERVER_TIMEOUT_SECONDS = 5


def local_store_dir() -> Path:
    return repository_root() / ".mlflow"


def uses_local_store() -> bool:
    """No server configured. Decide before `mlflow.set_tracking_uri`, which exports MLFLOW_TRACKING_URI itself."""
    return not os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri() -> str:
    if not uses_local_store():
        return os.environ["MLFLOW_TRACKING_URI"]
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


def connect():
    """An MlflowClient on the configured store, and the id of the experiment runs go to."""
    local_store = uses_local_store()
    uri = tracking_uri()
    check_server_answers(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow
    from mlflow.tracking import MlflowClient

    if local_store:
        local_store_dir().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    return client, _experiment_id(client, local_store)


def _experiment_id(client, local_store: bool) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME_DEFAULT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # In our local store, artifacts go next to the database (MLflow's default is ./mlruns of the
    # working directory, which for `dvc exp run --temp` is a temporary copy).
    artifact_location = (local_store_dir() / "artifacts").as_uri() if local_store else None
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by a parallel stage
        return client.get_experiment_by_name(name).experiment_id
