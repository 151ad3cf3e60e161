"""Sharing results across a team through a DVC remote (a local directory here) and its run-cache, on the tiny
pipeline: the first clone commits its outputs, pushes with `--run-cache`, runs a second param set and pushes
again; a teammate's clone then gets either set restored, never recomputed, and a refused experiment there keeps
every output. Each restored execution is a pipeline run in the teammate's MLflow, the same as the one that ran."""

import shutil

import pytest
from harness import STAGES, dvc, md5, mlflow_runs, pipeline_status, ran, run

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


def teammate(first, tmp_path):
    clone = tmp_path / "teammate"
    run(["git", "clone", "-q", str(first), str(clone)], tmp_path)  # .dvc/config names the remote
    return clone


def test_a_teammate_gets_both_pushed_param_sets_from_the_run_cache_without_rerunning_a_stage(team, built_repo, tmp_path):
    first, _ = team
    clone = teammate(first, tmp_path)
    shown = dvc(clone, "metrics", "show").stdout  # nothing pulled yet: DVC reads the metrics from the remote
    assert "heldout_acc" in shown and "val_bpb" in shown

    assert ran(dvc(clone, "repro", "--pull").stdout) == []  # the committed set
    assert md5(clone / "models/finetuned/model.safetensors") == md5(built_repo / "models/finetuned/model.safetensors")

    output = dvc(clone, "exp", "run", "--pull", "-S", SECOND).stdout  # the other set, as the first clone ran it
    assert ran(output) == [], output
    for stage in ("finetune", "quantize", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in output
    assert md5(clone / "models/finetuned/model.safetensors") == md5(first / "models/finetuned/model.safetensors")

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
