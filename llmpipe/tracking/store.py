"""Where MLflow runs are stored.

- `MLFLOW_TRACKING_URI` if set (a shared `mlflow server`, or any store MLflow accepts); a server that
  does not answer fails the stage before any work, naming the address;
- otherwise a SQLite database at `<repo>/.mlflow/mlflow.db` with artifacts in `<repo>/.mlflow/artifacts`,
  an absolute path. `<repo>` is DVC_ROOT, which DVC points at the user's repository even when an
  experiment runs in a temporary copy (`dvc exp run --temp` / `--queue`), so those runs are kept.
  MLflow stores that absolute path in the database; when the repository has been moved or copied,
  `relocate_local_store` rewrites it (and every run's and model's artifact address) to the new place
  before a stage logs anything, so a copy never writes into the directory it was copied from.

Open the UI:  mlflow ui --backend-store-uri sqlite:///$PWD/.mlflow/mlflow.db
"""

from __future__ import annotations

import logging
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from llmpipe.config.layout import repository_root
from llmpipe.errors import PipelineError

NOT_A_STAGE_DEPENDENCY = "where MLflow stores runs"  # see llmpipe.generate.code_deps

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
    """Fail fast, before any work, when a configured tracking server does not answer, or answers but cannot
    reach its own store (its database refusing connections): MLflow's client would retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME_DEFAULT)
    reason = health_problem(base)
    if reason is not None:
        raise PipelineError(f"MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) did not answer: {reason}")
    query = base + "/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": name})
    try:
        with urllib.request.urlopen(query, timeout=_SERVER_TIMEOUT_SECONDS * 4):
            pass
    except urllib.error.HTTPError as exc:  # 404: no such experiment yet; 401/403: MLflow's client sends credentials
        if exc.code >= 500:
            raise PipelineError(f"MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) answers but cannot read its "
                                f"store (HTTP {exc.code}): {_server_message(exc)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PipelineError(f"MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) did not answer a query: "
                            f"{getattr(exc, 'reason', exc)}") from None


def server_gone(error: BaseException) -> str | None:
    """Why a call to the configured tracking server failed when the server has gone away (it does not answer
    now: stopped, restarting, unreachable), in words naming it; None when it answers, or there is no server
    (the call's error is then a real one)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    reason = health_problem(uri.rstrip("/"))
    if reason is None:
        return None
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return f"tracking server at {uri} (MLFLOW_TRACKING_URI) stopped answering during the stage ({reason}; {first_line})"


def health_problem(base: str) -> object | None:
    """Why the server at `base` does not answer its /health endpoint now, or None when it does."""
    try:
        with urllib.request.urlopen(base + "/health", timeout=_SERVER_TIMEOUT_SECONDS):
            return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return getattr(exc, "reason", exc)


def _server_message(error) -> str:
    """The first line of an MLflow server's JSON error message (its database's own words), cut short."""
    import json

    try:
        message = str(json.loads(error.read().decode("utf-8", "replace")).get("message", ""))
    except (OSError, ValueError, AttributeError):
        message = ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return (lines[0] if lines else str(error.reason))[:300]


def connect():
    """An MlflowClient on the configured store, and the id of the experiment runs go to."""
    local_store = uses_local_store()
    uri = tracking_uri()
    check_server_answers(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # deferred: mlflow takes ~1.2 s to import; a process that logs nothing (ranks other than 0, a
    # StageRun(enabled=False), `llmpipe --help`) never loads it
    import mlflow
    from mlflow.tracking import MlflowClient

    if local_store:
        local_store_dir().mkdir(parents=True, exist_ok=True)
        relocate_local_store(local_store_dir())
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


# Where MLflow's SQLite schema keeps absolute artifact addresses (MLflow 3.x).
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))


def _stored_store_dir(database: sqlite3.Connection) -> Path | None:
    """The `.mlflow` directory the database was created in, from our experiment's artifact location."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME_DEFAULT)
    row = database.execute("SELECT artifact_location FROM experiments WHERE name = ?", (name,)).fetchone()
    if not row or not str(row[0]).startswith("file://") or not str(row[0]).endswith("/artifacts"):
        return None
    return Path(str(row[0])[len("file://"):]).parent


def relocate_local_store(store_dir: Path) -> Path | None:
    """Point the local store's artifact addresses at `store_dir` when the repository was moved or copied.

    Returns the directory the store was moved from, or None when nothing had to change.
    """
    path = store_dir / "mlflow.db"
    if not path.is_file():
        return None
    with sqlite3.connect(path, timeout=30) as database:
        try:
            old_store = _stored_store_dir(database)
        except sqlite3.DatabaseError:
            return None  # not created yet, or not a store we know: MLflow itself reports that
        if old_store is None or old_store == store_dir:
            return None
        old_repo, new_repo = str(old_store.parent), str(store_dir.parent)
        tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in _ARTIFACT_COLUMNS:
            if table not in tables:
                continue
            for old, new in ((f"file://{old_repo}/", f"file://{new_repo}/"), (f"{old_repo}/", f"{new_repo}/")):
                database.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                                 (new, len(old) + 1, len(old), old))
    print(f"MLflow store {path}: the repository moved from {old_repo}; artifact locations now point into {new_repo}",
          flush=True)
    return old_store
