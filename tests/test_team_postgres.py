"""A team's tracking server: `mlflow server` on a real PostgreSQL (Debian's `postgresql` package) with the
artifacts stored and served by the server, the whole pipeline logging to it over HTTP, and everything read
back through the server's REST API, as a teammate's browser or script would (docs/tracking.md, the team
recipe).

Without PostgreSQL's server programs (`pg_ctl`, `initdb`) the tests skip, saying so; under CI (CI=true) they
fail instead: .ci/run installs the package.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from harness import (BIN, dvc, environment, free_port, make_repo_copy, md5, run, skip_outside_ci,
                     stop_process_group, wait_until)

STAGES = ["prepare", "train_tokenizer", "tokenize", "pretrain", "finetune", "quantize", "evaluate"]
MODEL_NAME = "llmpipe-chat"
DATABASE, ROLE = "mlflow", "mlflow"
DATABASES: dict[str, "Postgres"] = {}  # by server url: the tests stop it


def postgres_programs() -> Path:
    """The directory with PostgreSQL's server programs (Debian keeps them off PATH), or skip/fail saying why."""
    if importlib.util.find_spec("psycopg") is None:
        skip_outside_ci("psycopg, MLflow's PostgreSQL driver, is not installed: `pip install -e \".[team]\"`")
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)]
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "createdb", "psql")):
            return directory
    skip_outside_ci("PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
                    "`apt-get install postgresql` (Debian/Ubuntu) runs the team tracking-server tests")


class Postgres:
    """A throwaway PostgreSQL cluster on a loopback port: data in a temporary directory, password login only.
    As root (CI containers), the cluster belongs to the `postgres` user the Debian package creates: PostgreSQL
    refuses to run as root."""

    def __init__(self, programs: Path, directory: Path):
        self.programs, self.directory = programs, directory
        self.data = directory / "data"
        self.port = free_port()
        self.superuser, self.password = "llmpipe_admin", secrets.token_hex(12)
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")  # created by the Debian package
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(directory, "postgres")
        (directory / "password").write_text(self.password)
        if self.as_user:
            shutil.chown(directory / "password", "postgres")

    def command(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "PGPASSWORD": self.password}
        result = subprocess.run([*self.as_user, str(self.programs / name), *args], env=env, cwd=self.directory,
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{name} exited {result.returncode}: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result

    def initialise(self) -> None:
        self.command("initdb", "-D", str(self.data), "-U", self.superuser, "--pwfile", str(self.directory / "password"),
                     "--auth", "scram-sha-256", "--encoding", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.directory}"
        self.command("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "server.log"), "-o", options,
                     "-w", "-t", "60", "start")

    def stop(self) -> None:
        self.command("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", check=False)

    def create_database(self, name: str, owner: str, password: str) -> None:
        """The recipe's `createuser` + `createdb`, over TCP with the superuser's password."""
        connection = ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.superuser]
        self.command("psql", *connection, "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c",
                     f"CREATE ROLE {owner} LOGIN PASSWORD '{password}'")
        self.command("createdb", *connection, "-O", owner, name)


def get(url: str, path: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.load(response)


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def search_runs(url: str, experiment_id: str) -> list[dict]:
    runs, token = [], None
    while True:
        page = post(url, "/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [experiment_id], "max_results": 1000, **({"page_token": token} if token else {})})
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def as_dict(entries: list[dict] | None) -> dict[str, str]:
    return {entry["key"]: entry["value"] for entry in entries or []}


@pytest.fixture
def postgres_tracking_server():
    """PostgreSQL plus `mlflow server` on it, artifacts served by the server. Yields (url, database uri,
    artifact directory); stops both afterwards."""
    programs = postgres_programs()
    directory = Path(tempfile.mkdtemp(prefix="llmpipe-postgres-"))  # the postgres user must reach it
    os.chmod(directory, 0o755)
    database = Postgres(programs, directory)
    server = None
    try:
        database.initialise()
        database.start()
        password = secrets.token_hex(12)
        database.create_database(DATABASE, ROLE, password)
        backend = f"postgresql://{ROLE}:{password}@127.0.0.1:{database.port}/{DATABASE}"
        artifacts = directory / "artifacts"
        port = free_port()
        log = open(directory / "mlflow-server.log", "wb")
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=environment(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        def answers() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"mlflow server exited {server.returncode}")
            return urllib.request.urlopen(url + "/health", timeout=2).status == 200

        try:
            wait_until(answers, 120, "mlflow server answered")
        except AssertionError:
            raise AssertionError("mlflow server did not answer:\n"
                                 + (directory / "mlflow-server.log").read_text(errors="replace")[-3000:]) from None
        DATABASES[url] = database
        yield url, backend, artifacts
    finally:
        if server is not None:
            stop_process_group(server)
        database.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_whole_pipeline_logs_to_a_postgres_backed_server_and_reads_back_over_rest(postgres_tracking_server,
                                                                                  tmp_path):
    url, backend, artifacts = postgres_tracking_server
    repo = make_repo_copy(tmp_path / "repo")
    output = dvc(repo, "repro", MLFLOW_TRACKING_URI=url).stdout
    assert all(f"Running stage '{stage}'" in output for stage in STAGES)
    assert not (repo / ".mlflow").exists()  # nothing in the local store: the server has it all

    experiment = get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="llmpipe")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # stored by the server
    runs = search_runs(url, experiment["experiment_id"])
    pipelines = [r for r in runs if as_dict(r["data"].get("tags"))["llmpipe.kind"] == "pipeline"]
    assert len(pipelines) == 1
    pipeline = pipelines[0]
    pipeline_id, pipeline_tags = pipeline["info"]["run_id"], as_dict(pipeline["data"].get("tags"))
    assert pipeline["info"]["status"] == "FINISHED" and pipeline_tags["llmpipe.stages_ran"] == ",".join(STAGES)
    assert as_dict(pipeline["data"].get("params"))["model.n_layer"] == "1"
    pipeline_metrics = {m["key"]: m["value"] for m in pipeline["data"]["metrics"]}
    assert {"pretrain.val_bpb", "finetune.heldout_acc", "evaluate.Q4_K"} <= set(pipeline_metrics)

    stage_runs = {r["info"]["run_name"]: r for r in runs if as_dict(r["data"].get("tags"))["llmpipe.kind"] == "stage"}
    assert sorted(stage_runs) == sorted(STAGES) and len(runs) == len(STAGES) + 1
    for name, stage_run in stage_runs.items():
        assert stage_run["info"]["status"] == "FINISHED", name
        assert as_dict(stage_run["data"]["tags"])["mlflow.parentRunId"] == pipeline_id, name
        assert stage_run["info"]["end_time"] <= pipeline["info"]["end_time"], name
    pretrain_metrics = {m["key"]: m["value"] for m in stage_runs["pretrain"]["data"]["metrics"]}
    assert pretrain_metrics["val_bpb"] == pipeline_metrics["pretrain.val_bpb"]
    curve = get(url, "/api/2.0/mlflow/metrics/get-history", run_id=stage_runs["pretrain"]["info"]["run_id"],
                metric_key="train_loss")["metrics"]
    assert sorted(point["step"] for point in curve) == [1, 2, 3, 4, 5, 6]
    assert "validation_characters_per_token" in {m["key"] for m in stage_runs["train_tokenizer"]["data"]["metrics"]}

    # Artifacts go through the server into its --artifacts-destination, and come back from it.
    tokenizer_id = stage_runs["train_tokenizer"]["info"]["run_id"]
    listed = {f["path"] for f in get(url, "/api/2.0/mlflow/artifacts/list", run_id=tokenizer_id)["files"]}
    assert {"tokenizer", "tokenizer.md"} <= listed
    with urllib.request.urlopen(f"{url}/get-artifact?" + urllib.parse.urlencode(
            {"path": "tokenizer.md", "run_uuid": tokenizer_id}), timeout=30) as response:
        assert response.read() == (repo / "reports/tokenizer.md").read_bytes()
    assert list(artifacts.rglob("tokenizer.md"))

    model = get(url, "/api/2.0/mlflow/registered-models/get", name=MODEL_NAME)["registered_model"]
    assert [alias["alias"] for alias in model.get("aliases", [])] == ["champion"]
    champion = get(url, "/api/2.0/mlflow/registered-models/alias", name=MODEL_NAME, alias="champion")["model_version"]
    assert champion["version"] == "1" and champion["status"] == "READY"
    assert champion["run_id"] == stage_runs["evaluate"]["info"]["run_id"]
    version_tags = as_dict(champion.get("tags"))
    assert version_tags["source"] == "workspace" and version_tags["alias"] == "champion"
    assert 0 <= float(version_tags["metric.qa_accuracy_heldout_people"]) <= 1

    # The rows are in PostgreSQL: the server's only store.
    import psycopg

    with psycopg.connect(backend) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == len(STAGES) + 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_database_refusing_connections_stops_a_stage_before_any_work_naming_it(postgres_tracking_server, tmp_path):
    url, backend, artifacts = postgres_tracking_server
    repo = make_repo_copy(tmp_path / "repo")
    run([sys.executable, "stages/prepare.py"], repo, MLFLOW_TRACKING_URI=url)
    before = {path: md5(path) for path in sorted((repo / "data/prepared").iterdir())}
    DATABASES[url].stop()
    start = time.time()
    result = run([sys.executable, "stages/prepare.py"], repo, check=False, MLFLOW_TRACKING_URI=url)
    assert time.time() - start < 30  # MLflow's client alone retries for minutes
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow tracking server at {url} (MLFLOW_TRACKING_URI) answers but cannot read "
                           f"its store") and "Connection refused" in last, last
    assert {path: md5(path) for path in sorted((repo / "data/prepared").iterdir())} == before
