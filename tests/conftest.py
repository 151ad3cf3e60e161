"""Fixtures and rules for the whole suite.

- `built_repo`: a tiny copy of the repository (tests/harness.py) on which `dvc repro` has run the whole pipeline.
  The pipeline runs once per session, whatever the number of xdist workers: the first worker that needs it builds
  it under a file lock in the session's shared temporary folder, and each worker reads its own copy of that build.
- Every test that runs the pipeline is marked slow, so `python -m pytest -m "not slow"` is the quick subset: a test
  that uses `built_repo` (directly or through another fixture) is marked here; any other test that starts DVC, a
  stage script or the multi-process launcher fails until it carries `@pytest.mark.slow`.
- Under xdist, each worker's torch (and the processes it starts) uses its share of the cores: two workers with
  two threads each on two cores make torch's thread pools wait on each other, many times slower than one thread.
- Tests that do not need `built_repo` run first, so the other workers keep busy while one of them builds it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _pytest.nodeid import coerce_node_id
from filelock import FileLock
from harness import BIN, dvc, environment, free_port, make_repo_copy, runs_the_pipeline, stop_process_group

BUILT = "built_repo"


def threads_per_worker() -> int | None:
    """Each xdist worker's share of the cores; None outside xdist (torch's own default)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, len(os.sched_getaffinity(0)) // workers) if workers > 1 else None


if threads_per_worker() is not None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker()))  # read by torch here and in every subprocess
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def keep_groups_on_one_worker(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each `xdist_group` test the `@group` id suffix that `--dist loadgroup` schedules by, so a file's group
    runs on one worker and its module fixture (a `dvc exp run` of three stages) runs once. pytest-xdist 3.8 writes
    the suffix to `item._nodeid`, which pytest 9 no longer reads (a node's id is `item._id`), so it is set here."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist workers under --dist loadgroup
        return
    for item in items:
        groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                         for mark in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = coerce_node_id(item.nodeid + suffix)


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep_groups_on_one_worker(config, items)
    builds = [BUILT in getattr(item, "fixturenames", ()) for item in items]
    for item, uses_build in zip(items, builds):
        if uses_build:
            item.add_marker(pytest.mark.slow)
    # One test that needs the build first (its worker builds), then everything that does not, then the rest;
    # a stable sort, so each file's tests keep their order.
    first = builds.index(True) if True in builds else None
    order = {id(item): (index != first, uses_build) for index, (item, uses_build) in enumerate(zip(items, builds))}
    items.sort(key=lambda item: order[id(item)])


@pytest.fixture(autouse=True)
def refuse_the_pipeline_in_a_quick_test(request, monkeypatch):
    """A test not marked slow that starts DVC, a stage or the launcher fails, naming the command."""
    if request.node.get_closest_marker("slow"):
        return
    start = subprocess.Popen.__init__

    def checked(self, args, *rest, **options):
        if runs_the_pipeline(args):
            command = args if isinstance(args, str) else " ".join(map(os.fsdecode, args))
            pytest.fail(f"{request.node.nodeid} runs {command!r} but is not marked slow: "
                        "add @pytest.mark.slow (every test that runs DVC, a stage or the launcher carries it)",
                        pytrace=False)
        start(self, args, *rest, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked)


def shared_build(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's one build: built by the first worker to get here, read by all."""
    workerinput = getattr(config, "workerinput", None)  # set in xdist workers
    base = tmp_path_factory.getbasetemp()
    # An xdist worker's base is <session>/popen-gwN: the parent is shared, named by the run's id (the same in every
    # worker), so a build left there by an earlier run with the same --basetemp is never taken for this one's.
    shared = base.parent / f"built-{workerinput['testrunuid']}" if workerinput else base / "built-shared"
    repo, log, failed = shared / "repo", shared / "first_repro.log", shared / "failed.log"
    shared.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shared / "lock")):
        if failed.exists():
            raise RuntimeError(f"building the tiny pipeline failed in another worker:\n{failed.read_text()}")
        if not log.exists():
            shutil.rmtree(repo, ignore_errors=True)
            try:
                make_repo_copy(repo)
                result = dvc(repo, "repro")
            except BaseException as error:
                failed.write_text(str(error))
                raise
            log.write_text(result.stdout + result.stderr)
    return repo


@pytest.fixture(scope="session")
def built_repo(request, tmp_path_factory) -> Path:
    """A tiny copy on which `dvc repro` has run the whole pipeline once (its output in ../first_repro.log). This
    worker's own copy of the session's build: tests must not modify it: copy it with `copy_built` first."""
    build = shared_build(request.config, tmp_path_factory)
    mine = tmp_path_factory.mktemp("built") / "repo"
    shutil.copytree(build, mine, symlinks=True)
    shutil.copy2(build.parent / "first_repro.log", mine.parent / "first_repro.log")
    return mine


@pytest.fixture
def copy_built(built_repo, tmp_path):
    """A private copy of the built repository (outputs, DVC cache, git history and MLflow store)."""
    def make() -> Path:
        target = tmp_path / "repo"
        shutil.copytree(built_repo, target, symlinks=True)
        return target
    return make


class MlflowServer:
    """`mlflow server` on a SQLite file and an artifact directory under `directory`, on a loopback port it keeps
    when stopped (SIGTERM) and started again."""

    def __init__(self, directory: Path):
        self.directory, self.port, self.process = directory, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.directory / 'server.db'}",
             "--artifacts-destination", str(self.directory / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"], env=environment(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        os.killpg(self.process.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        """SIGTERM to the server and its workers (SIGKILL after 30 s)."""
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None


@pytest.fixture
def restartable_mlflow_server(tmp_path):
    """A test's own `mlflow server` on SQLite on a loopback port, which the test may stop and start again."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(restartable_mlflow_server):
    """`mlflow server` on SQLite on a loopback port, for one test: its URL."""
    return restartable_mlflow_server.url
