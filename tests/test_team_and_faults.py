"""Team use and failure: a shared MLflow server, untrusted files, killed stages (the shared DVC remote and
run-cache: tests/test_team_sharing.py)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from harness import BIN, dvc, environment, free_port, md5, mlflow_runs, run




def test_stage_runs_land_on_a_shared_tracking_server(copy_built, mlflow_server):
    repo = copy_built()
    run([sys.executable, "stages/train_tokenizer.py"], repo, MLFLOW_TRACKING_URI=mlflow_server)
    request = urllib.request.Request(
        mlflow_server + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=llmpipe")
    experiment = json.load(urllib.request.urlopen(request, timeout=10))["experiment"]
    body = json.dumps({"experiment_ids": [experiment["experiment_id"]],
                       "filter": "attributes.run_name = 'train_tokenizer'"}).encode()
    search = urllib.request.Request(mlflow_server + "/api/2.0/mlflow/runs/search", data=body,
                                    headers={"Content-Type": "application/json"})
    runs = json.load(urllib.request.urlopen(search, timeout=10))["runs"]
    assert len(runs) == 1
    params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
    assert params["tokenizer.vocab_size"] == "300" and runs[0]["info"]["status"] == "FINISHED"


def test_unreachable_tracking_server_fails_fast_before_any_work(copy_built):
    repo = copy_built()
    before = md5(repo / "models/tokenizer/tokenizer.json")
    address = f"http://127.0.0.1:{free_port()}"
    start = time.time()
    result = run([sys.executable, "stages/train_tokenizer.py"], repo, check=False, MLFLOW_TRACKING_URI=address)
    assert time.time() - start < 20
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: MLflow tracking server at {address}")
    assert md5(repo / "models/tokenizer/tokenizer.json") == before


class PlantMarker:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_checkpoint_is_never_unpickled(copy_built, tmp_path):
    repo = copy_built()
    marker = tmp_path / "code-ran"
    code = ("import yaml, json; from llmpipe.config.params import StageParams, declared_dependencies; "
            "from llmpipe.tracking.provenance import input_hashes; from llmpipe.train.checkpoint import CheckpointStore; "
            "p = StageParams.for_stage('pretrain', yaml.safe_load(open('params.yaml'))); "
            "print(CheckpointStore.for_stage('pretrain', p.declared_values(), "
            "input_hashes(declared_dependencies('pretrain'))).directory)")
    checkpoint = Path(run([sys.executable, "-c", code], repo).stdout.strip()) / "step-0000002"
    checkpoint.mkdir(parents=True)
    poison = pickle.dumps(PlantMarker(marker))
    for name in ("model.safetensors", "training.safetensors", "model.pt", "optimizer.pt"):
        (checkpoint / name).write_bytes(poison)
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "history": {"train": [], "eval": []},
                                                       "param_groups": []}))
    result = run([sys.executable, "stages/pretrain.py"], repo, check=False)
    assert result.returncode == 1 and "unreadable checkpoint" in result.stderr
    assert not marker.exists()


def test_no_code_loads_torch_files_with_pickle():
    sources = [p for p in Path(__file__).resolve().parents[1].glob("**/*.py")
               if ".venv" not in p.parts and "tests" not in p.parts]
    for source in sources:
        text = source.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{source}: {line.strip()}"
            assert "pickle.load" not in line, f"{source}: {line.strip()}"


def test_seed_sweep_runs_queued_experiments_together_and_summarises_them(copy_built):
    """llmpipe sweep: two seeds queued and run two at a time; each keeps its MLflow runs; the summary's
    mean/min/max agree with the metrics each experiment logged; a second call runs nothing again."""
    repo = copy_built()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline outputs"], repo)
    sweep = [sys.executable, "-m", "llmpipe.cli", "sweep", "run", "tiny", "--seeds", "3", "4", "--jobs", "2",
             "-S", "pretrain.max_steps=5", "--target", "pretrain", "--poll-seconds", "1"]
    output = run(sweep, repo).stdout
    assert "queued tiny-seed3, tiny-seed4" in output

    client, runs = mlflow_runs(repo)
    logged = {}
    for name, seed in (("tiny-seed3", "3"), ("tiny-seed4", "4")):
        pretrain = [r for r in runs if r.data.tags.get("dvc.experiment") == name and r.info.run_name == "pretrain"]
        assert len(pretrain) == 1 and pretrain[0].info.status == "FINISHED"
        assert pretrain[0].data.params["seed"] == seed and pretrain[0].data.params["pretrain.max_steps"] == "5"
        logged[name] = pretrain[0].data.metrics["val_bpb"]
    summary = json.loads((repo / "reports/seeds/tiny.json").read_text())
    assert [e["name"] for e in summary["experiments"]] == ["tiny-seed3", "tiny-seed4"]
    assert summary["overrides"] == ["pretrain.max_steps=5"]
    spread = summary["metrics"]["pretrain.val_bpb"]
    assert spread["count"] == 2 and logged["tiny-seed3"] != logged["tiny-seed4"]
    assert spread["min"] == pytest.approx(min(logged.values())) and spread["max"] == pytest.approx(max(logged.values()))
    assert spread["mean"] == pytest.approx(sum(logged.values()) / 2)
    assert not any(name.startswith("evaluate.") for name in summary["metrics"])  # not run: the baseline's files
    aggregate = [r for r in runs if r.data.tags.get("llmpipe.sweep") == "tiny"]
    assert len(aggregate) == 1 and aggregate[0].data.tags["dvc.experiments"] == "tiny-seed3,tiny-seed4"
    assert aggregate[0].data.metrics["pretrain.val_bpb.max"] == pytest.approx(spread["max"])
    again = run(sweep, repo).stdout
    assert "tiny-seed3: already run, kept" in again and "queued" not in again
    run([sys.executable, "-m", "llmpipe.cli", "sweep", "summary", "tiny", "--target", "pretrain", "--seeds", "4"], repo)
    only_seed4 = json.loads((repo / "reports/seeds/tiny.json").read_text())
    assert [e["name"] for e in only_seed4["experiments"]] == ["tiny-seed4"]
    assert only_seed4["metrics"]["pretrain.val_bpb"]["mean"] == pytest.approx(logged["tiny-seed4"])


OUTPUTS = {"prepare": ["data/prepared"], "train_tokenizer": ["models/tokenizer", "reports/tokenizer.md"],
           "tokenize": ["data/tokens"], "quantize": ["models/gguf", "models/hf", "reports/quantize/sizes.json"],
           "evaluate": ["reports/report.md", "reports/evaluate/metrics.json"]}


def tree_md5(path: Path) -> str | None:
    if not path.exists():
        return None
    if path.is_file():
        return md5(path)
    return "".join(f"{p.relative_to(path)}:{md5(p)}" for p in sorted(path.rglob("*")) if p.is_file())


@pytest.mark.parametrize("stage", list(OUTPUTS))
def test_sigkill_during_a_stage_leaves_no_output_dvc_would_trust(copy_built, stage):
    repo = copy_built()
    complete = {out: tree_md5(repo / out) for out in OUTPUTS[stage]}
    process = subprocess.Popen([str(BIN / "dvc"), "repro", "--force", "--single-item", stage], cwd=repo,
                               env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    time.sleep(3.5)  # DVC has removed the outputs and the stage is at work
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for out, digest in complete.items():
        assert tree_md5(repo / out) in (None, digest), f"{out} is partly written"
    status = dvc(repo, "status", stage).stdout
    if any(tree_md5(repo / out) is None for out in complete):
        assert stage in status  # DVC knows the stage must run again
    dvc(repo, "repro", stage)
    for out, digest in complete.items():
        if not out.startswith(("reports/report", "reports/evaluate", "models/hf")):  # speeds and registry versions vary
            assert tree_md5(repo / out) == digest, out


@pytest.mark.slow
def test_a_stage_whose_tracking_server_goes_away_finishes_and_says_its_run_could_not_be_closed(
        copy_built, restartable_mlflow_server):
    """The server stopped with SIGTERM while pretrain works (the stage paused meanwhile, so it is mid-run whatever
    the machine's speed), then started again: the stage writes its outputs, ends in one line naming the server,
    and the next stage to start closes the run it left open."""
    from mlflow.tracking import MlflowClient

    from llmpipe.tracking.orphans import REASON_TAG, close_orphaned_runs

    repo, server = copy_built(), restartable_mlflow_server
    outputs = ("models/pretrained/model.safetensors", "reports/pretrain/metrics.json", "reports/pretrain/details.json")
    built = {name: md5(repo / name) for name in outputs}
    stage = subprocess.Popen([sys.executable, "stages/pretrain.py"], cwd=repo, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=environment(MLFLOW_TRACKING_URI=server.url,
                                                                     MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"))
    for line in stage.stdout:
        if "parameters" in line:  # its run is open on the server; training starts
            break
    stage.send_signal(signal.SIGSTOP)
    server.stop()
    stage.send_signal(signal.SIGCONT)
    out, err = stage.communicate(timeout=300)
    assert stage.returncode == 0, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("warning: pretrain: outputs written, but its MLflow run ") and "could not be closed: " \
        f"tracking server at {server.url} (MLFLOW_TRACKING_URI) stopped answering during the stage" in last, last
    assert {name: md5(repo / name) for name in outputs} == built  # what an untroubled run writes

    server.start()
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("llmpipe")
    (left,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'pretrain'")
    assert left.info.status == "RUNNING" and left.data.params["pretrain.max_steps"] == "6"
    assert close_orphaned_runs(client, experiment.experiment_id, "finetune") == ["pretrain"]  # as the next stage does
    closed = client.get_run(left.info.run_id)
    assert closed.info.status == "FAILED" and "ended without closing the run" in closed.data.tags[REASON_TAG]
