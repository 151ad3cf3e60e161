"""Two teammates at once: two clones run `dvc exp run` with different params at the same time against one MLflow
server (`mlflow_server` in tests/conftest.py, on SQLite) and one DVC remote over SSH (tests/ssh_server.py), then both
push; a third clone restores either experiment. And two queued experiments run two at a time
(`dvc queue start -j 2`) against the server. The experiments change an evaluate param, so only evaluate runs:
the stage that registers the model and moves `champion`."""

import subprocess
import time

import pytest
from harness import BIN, dvc, environment, md5, ran, run
from ssh_server import SshServer

from llmpipe.serve.alias import ALIAS, RULE_METRIC_TAG, SOURCE_TAG, TEMPORARY, WORKSPACE

pytestmark = pytest.mark.xdist_group("team_concurrent")
SETS = {"alice": "evaluate.max_questions_per_split=4", "bob": "evaluate.max_questions_per_split=6"}
CHEAP = ["-S", "evaluate.measure_base=false", "-S", "evaluate.eval_max_tokens=128", "-S", "evaluate.kl_max_tokens=64"]
MODEL = "llmpipe-chat"


def pipeline_runs(client):
    experiment = client.get_experiment_by_name("llmpipe")
    return [r for r in client.search_runs([experiment.experiment_id], max_results=1000)
            if r.data.tags.get("llmpipe.kind") == "pipeline"]


def rule_pick(versions) -> str:
    """`champion` by the rule, computed here: the best held-out accuracy among workspace versions, the earlier
    version on a tie."""
    eligible = [v for v in versions if v.tags.get(SOURCE_TAG) == WORKSPACE]
    best = max(float(v.tags[RULE_METRIC_TAG]) for v in eligible)
    return str(min(int(v.version) for v in eligible if float(v.tags[RULE_METRIC_TAG]) == best))


@pytest.fixture
def origin(copy_built, tmp_path):
    """(the built repository committed with an SSH remote that holds its outputs and run-cache, the sshd)."""
    server = SshServer(tmp_path / "sshd")
    server.start()
    repo = copy_built()
    server.use_as_remote(repo, "team", tmp_path / "remote")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline outputs and the team remote"], repo)
    dvc(repo, "push", "--run-cache")
    yield repo, server
    server.stop()


def clone(origin, tmp_path, name: str):
    repo, server = origin
    target = tmp_path / name
    run(["git", "clone", "-q", str(repo), str(target)], tmp_path)
    server.give_credentials(target, "team")
    return target


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_teammates_run_experiments_at_once_against_one_server_and_one_remote(origin, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    clones = {name: clone(origin, tmp_path, name) for name in SETS}
    for repo in clones.values():
        dvc(repo, "pull")  # the committed outputs, before the clock starts
    started = time.monotonic()
    running = {name: subprocess.Popen([str(BIN / "dvc"), "exp", "run", "-S", SETS[name], *CHEAP], cwd=repo,
                                      env=environment(MLFLOW_TRACKING_URI=mlflow_server), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
               for name, repo in clones.items()}
    outputs = {name: process.communicate(timeout=600)[0] for name, process in running.items()}
    print(f"two experiments at once: {time.monotonic() - started:.1f} s")
    for name, process in running.items():
        assert process.returncode == 0 and ran(outputs[name]) == ["evaluate"], outputs[name]
    for repo in clones.values():
        dvc(repo, "push", "--run-cache")

    client = MlflowClient(mlflow_server)
    pipelines = {run.data.params["evaluate.max_questions_per_split"]: run for run in pipeline_runs(client)}
    assert sorted(pipelines) == ["4", "6"]
    keys = [set(run.data.metrics) for run in pipelines.values()]
    assert keys[0] == keys[1] and {"pretrain.val_bpb", "finetune.heldout_acc", "evaluate.Q4_K"} <= keys[0]
    assert all(run.info.status == "FINISHED" for run in pipelines.values())
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    assert client.get_model_version_by_alias(MODEL, ALIAS).version == rule_pick(versions)

    carol = clone(origin, tmp_path, "carol")  # a third teammate: either experiment, from the remote
    for name in SETS:
        output = dvc(carol, "exp", "run", "--pull", "-S", SETS[name], *CHEAP).stdout
        assert ran(output) == [] and "Stage 'evaluate' is cached - skipping run" in output, output
        assert md5(carol / "reports/evaluate/metrics.json") == md5(clones[name] / "reports/evaluate/metrics.json")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_queued_experiments_run_two_at_a_time_against_the_server(origin, mlflow_server):
    from mlflow.tracking import MlflowClient

    repo, _ = origin
    for name, change in SETS.items():
        dvc(repo, "exp", "run", "--queue", "--name", name, "-S", change, *CHEAP)
    started = time.monotonic()
    dvc(repo, "queue", "start", "-j", "2", MLFLOW_TRACKING_URI=mlflow_server)
    status = ""
    while time.monotonic() - started < 600:
        status = dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    print(f"two queued experiments, two at a time: {time.monotonic() - started:.1f} s")
    assert status.count("Success") == 2, status

    client = MlflowClient(mlflow_server)
    pipelines = {run.data.tags.get("dvc.experiment"): run for run in pipeline_runs(client)}
    assert sorted(pipelines) == sorted(SETS) and all(r.info.status == "FINISHED" for r in pipelines.values())
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(v.tags[SOURCE_TAG] for v in versions) == [TEMPORARY, TEMPORARY]
    assert not client.get_registered_model(MODEL).aliases  # a queued experiment never takes `champion`
