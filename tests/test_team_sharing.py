"""Sharing results across a team through a DVC remote and its run-cache, on the tiny pipeline: the first clone
commits its outputs, pushes with `--run-cache` to a directory remote, runs a second param set and pushes again; a
teammate's clone then gets either set restored, never recomputed, and a refused experiment there keeps every
output. Each restored execution is a pipeline run in the teammate's MLflow, the same as the one that ran. The same
over SSH (a throwaway sshd on a loopback port, tests/ssh_server.py) and S3 (moto's S3 server on a loopback port),
and an SSH remote that is down when someone pushes."""

import importlib.util
import socket
import shutil
import subprocess
import time
import urllib.request

import pytest
from harness import (STAGES, BIN, dvc, free_port, md5, mlflow_runs, pipeline_status, ran, run, skip_outside_ci,
                     stop_process_group, wait_until)
from ssh_server import SshServer

pytestmark = pytest.mark.xdist_group("team_sharing")  # one worker: the team fixture runs three stages

SECOND = "finetune.learning_rate=0.002"  # the tiny config's is 0.003


@pytest.fixture(scope="module")
def team(built_repo, tmp_path_factory):
    """(first clone, remote): the built repository committed, with a directory remote that holds both sets."""
    base = tmp_path_factory.mktemp("team")
    first, remote = base / "first", base / "remote"
    shutil.copytree(built_repo, first, symlinks=True)
    dvc(first, "remote", "add", "-d", "team", str(remote))
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "pipeline outputs and the team remote"], first)
    dvc(first, "push", "--run-cache")
    assert ran(dvc(first, "exp", "run", "-S", SECOND).stdout) == ["finetune", "quantize", "evaluate"]
    dvc(first, "push", "--run-cache")  # the experiment's outputs (in the workspace) and its run-cache entries
    return first, remote


def teammate(first, tmp_path, name: str = "teammate"):
    clone = tmp_path / name
    run(["git", "clone", "-q", str(first), str(clone)], tmp_path)  # .dvc/config names the remote
    return clone


def assert_restores_both_sets(clone, committed, experiment) -> None:
    """`dvc repro --pull` restores the committed set and `dvc exp run --pull -S SECOND` the experiment's, in
    `clone`, running no stage: the outputs are those of the `committed` and `experiment` workspaces."""
    assert ran(dvc(clone, "repro", "--pull").stdout) == []  # the committed set
    assert md5(clone / "models/finetuned/model.safetensors") == md5(committed / "models/finetuned/model.safetensors")

    output = dvc(clone, "exp", "run", "--pull", "-S", SECOND).stdout  # the other set, as the first clone ran it
    assert ran(output) == [], output
    for stage in ("finetune", "quantize", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in output
    assert md5(clone / "models/finetuned/model.safetensors") == md5(experiment / "models/finetuned/model.safetensors")


def test_a_teammate_gets_both_pushed_param_sets_from_the_run_cache_without_rerunning_a_stage(team, built_repo, tmp_path):
    first, _ = team
    clone = teammate(first, tmp_path)
    shown = dvc(clone, "metrics", "show").stdout  # nothing pulled yet: DVC reads the metrics from the remote
    assert "heldout_acc" in shown and "val_bpb" in shown
    assert_restores_both_sets(clone, built_repo, first)

    back = dvc(clone, "exp", "run", "--pull", "-S", "finetune.learning_rate=0.003").stdout  # and back again
    assert ran(back) == [] and "Stage 'finetune' is cached" in back
    assert md5(clone / "models/finetuned/model.safetensors") == md5(built_repo / "models/finetuned/model.safetensors")
    assert run(["git", "status", "--porcelain"], clone).stdout == ""  # params.yaml and dvc.lock as committed

    # Each of the three restored executions logged a pipeline run, with the params and metrics of the run that
    # computed those outputs in the first clone: the baseline, then the experiment, then the baseline again.
    pipelines = {}
    for repo in (first, clone):
        _, runs = mlflow_runs(repo)
        pipelines[repo] = sorted((r for r in runs if r.data.tags["llmpipe.kind"] == "pipeline"),
                                 key=lambda r: r.info.start_time)
    baseline, experiment = pipelines[first]
    assert len(pipelines[clone]) == 3 and not [r for r in mlflow_runs(clone)[1] if r.data.tags["llmpipe.kind"] == "stage"]
    for restored, computed in zip(pipelines[clone], (baseline, experiment, baseline)):
        assert restored.info.status == "FINISHED" and restored.data.tags["llmpipe.stages_ran"] == ""
        assert restored.data.params == computed.data.params and restored.data.metrics == computed.data.metrics
    assert pipelines[clone][1].data.params["finetune.learning_rate"] == "0.002"
    assert baseline.data.tags["llmpipe.stages_ran"] == ",".join(STAGES)


def test_a_refused_experiment_in_a_pulled_clone_keeps_every_output(team, tmp_path):
    clone = teammate(team[0], tmp_path)
    dvc(clone, "repro", "--pull")
    before = {name: md5(clone / name) for name in ("reports/pretrain/metrics.json", "reports/pretrain/train_curve.csv",
                                                  "reports/pretrain/details.json", "models/pretrained/model.safetensors")}
    refused = dvc(clone, "exp", "run", "-S", "+pretrain.learning_rat=1", check=False)
    assert refused.returncode != 0 and "did you mean pretrain.learning_rate?" in refused.stderr
    assert run(["git", "status", "--porcelain"], clone).stdout == ""
    assert {name: md5(clone / name) for name in before} == before
    assert pipeline_status(clone) == ""


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory):
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


def test_over_ssh_a_teammate_gets_both_pushed_param_sets_from_the_run_cache(team, ssh_server, built_repo, tmp_path):
    first, _ = team
    alice = tmp_path / "alice"  # the first clone: the committed set, and the experiment's in the workspace
    shutil.copytree(first, alice, symlinks=True)
    dvc(alice, "remote", "remove", "team")  # the directory remote goes: only SSH is left to pull from
    ssh_server.use_as_remote(alice, "team", tmp_path / "remote")
    assert "keyfile" not in (alice / ".dvc/config").read_text()  # credentials stay in .dvc/config.local
    run(["git", "add", ".dvc/config"], alice)
    run(["git", "commit", "-qm", "the team remote, over SSH"], alice)
    dvc(alice, "push", "--run-cache", "--all-commits")  # HEAD's outputs, the workspace's, every stage run's record
    assert (tmp_path / "remote/runs").is_dir() and (tmp_path / "remote/files/md5").is_dir()

    bob = teammate(alice, tmp_path, "bob")
    ssh_server.give_credentials(bob, "team")
    assert_restores_both_sets(bob, built_repo, first)


def test_a_push_to_an_ssh_remote_that_is_down_fails_naming_the_address_and_keeps_everything(copy_built, tmp_path):
    repo = copy_built()
    server = SshServer(tmp_path / "sshd")
    server.use_as_remote(repo, "team", tmp_path / "remote")
    outputs = {path: md5(path) for path in sorted((repo / "models").rglob("*")) if path.is_file()}
    committed = run(["git", "status", "--porcelain"], repo).stdout

    def unchanged() -> None:
        assert {path: md5(path) for path in outputs} == outputs
        assert run(["git", "status", "--porcelain"], repo).stdout == committed

    server.start()
    server.stop()  # nothing listens on the port any more
    refused = dvc(repo, "push", "--run-cache", check=False)
    # DVC reports each run-cache entry it could not send, then the push: every line names the address refused.
    errors = [line for line in refused.stderr.splitlines() if line.startswith("ERROR")]
    assert refused.returncode != 0 and errors, refused.stderr
    assert all(f"Connect call failed ('127.0.0.1', {server.port})" in line for line in errors), refused.stderr
    assert errors[-1].startswith("ERROR: unexpected error - ") and "Traceback" not in refused.stderr
    unchanged()
    assert not (tmp_path / "remote").exists()

    # A host that accepts the connection and never answers: the remote's `timeout` (docs/team.md) bounds the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        dvc(repo, "remote", "modify", "team", "url", f"ssh://127.0.0.1:{silent.getsockname()[1]}{tmp_path / 'remote'}")
        dvc(repo, "remote", "modify", "--local", "team", "timeout", "3")
        started = time.monotonic()
        hung = dvc(repo, "push", check=False)  # with --run-cache, one timeout per run-cache entry
        assert hung.returncode != 0 and time.monotonic() - started < 30, hung.stderr
    unchanged()

    server.start()  # back: the same push goes through
    dvc(repo, "remote", "modify", "team", "url", f"{server.url}{tmp_path / 'remote'}")
    dvc(repo, "push", "--run-cache")
    server.stop()
    unchanged()
    assert pipeline_status(repo) == ""


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3-compatible server on a loopback port with one empty bucket, `team`: its endpoint URL."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("dvc_s3") is None:
        skip_outside_ci("moto's S3 server or DVC's S3 support is not installed: `pip install -e \".[dev]\"`")
    import boto3

    port, log = free_port(), tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "wb") as output:
        server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).status == 200, 60,
                   "moto's S3 server answered")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="alice",
                     aws_secret_access_key="alice-secret").create_bucket(Bucket="team")
        yield endpoint
    finally:
        stop_process_group(server, timeout=10)


def give_s3_credentials(clone) -> None:
    """Each teammate's key, in .dvc/config.local (never committed); on AWS, ~/.aws/credentials does as well."""
    dvc(clone, "remote", "modify", "--local", "team", "access_key_id", "alice")
    dvc(clone, "remote", "modify", "--local", "team", "secret_access_key", "alice-secret")


def test_over_s3_a_teammate_gets_a_pushed_experiment_from_the_run_cache(team, s3_endpoint, tmp_path):
    first, _ = team
    alice = tmp_path / "alice"
    shutil.copytree(first, alice, symlinks=True)
    dvc(alice, "remote", "remove", "team")
    dvc(alice, "remote", "add", "-d", "team", "s3://team/llmpipe")
    dvc(alice, "remote", "modify", "team", "endpointurl", s3_endpoint)  # not needed on AWS itself
    give_s3_credentials(alice)
    run(["git", "add", ".dvc/config"], alice)
    run(["git", "commit", "-qm", "the team remote, on S3"], alice)
    dvc(alice, "push", "--run-cache", "--all-commits")

    bob = teammate(alice, tmp_path, "bob")
    give_s3_credentials(bob)
    output = dvc(bob, "exp", "run", "--pull", "-S", SECOND).stdout  # every stage's outputs come from the bucket
    assert ran(output) == [], output
    assert "Stage 'finetune' is cached - skipping run, checking out outputs" in output
    assert md5(bob / "models/finetuned/model.safetensors") == md5(first / "models/finetuned/model.safetensors")
