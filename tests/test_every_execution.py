"""Every execution of the pipeline is one MLflow pipeline run, compared like for like with any other: one whose
stages DVC restored from the run-cache logs the same params (the whole configuration, nulls as the stages
resolved them) and the same metrics as the one whose stages ran (llmpipe.tracking.pipeline_run, stage
log_pipeline). A teammate's restore from a remote: tests/test_team_sharing.py."""

import shutil

import pytest
import yaml
from harness import STAGES, dvc, mlflow_runs, pipeline_status, ran

from llmpipe.config.params import flatten


def pipeline_runs(repo):
    client, runs = mlflow_runs(repo)
    return [r for r in runs if r.data.tags.get("llmpipe.kind") == "pipeline"], runs


@pytest.mark.slow
def test_an_execution_restored_from_the_run_cache_logs_the_pipeline_run_of_one_that_ran(copy_built):
    repo = copy_built()
    (ran_run,), before = pipeline_runs(repo)
    for output in ("data/prepared", "data/tokens", "models", "reports"):
        shutil.rmtree(repo / output)
    output = dvc(repo, "repro").stdout
    assert ran(output) == [], output
    assert all(f"Stage '{stage}' is cached - skipping run" in output for stage in STAGES), output
    assert pipeline_status(repo) == ""

    pipelines, after = pipeline_runs(repo)
    (restored,) = [r for r in pipelines if r.info.run_id != ran_run.info.run_id]
    assert len(after) == len(before) + 1  # the pipeline run only: no stage ran
    assert restored.info.status == "FINISHED"
    assert restored.data.tags["llmpipe.stages_ran"] == "" and restored.data.tags["llmpipe.stages_cached"] == ",".join(
        STAGES)
    assert restored.data.params == ran_run.data.params  # every key, the same values
    assert set(restored.data.params) == set(flatten(yaml.safe_load((repo / "params.yaml").read_text())))
    assert restored.data.params["model.vocab_size"] == "300"  # null in params.yaml: as pretrain resolved it
    assert restored.data.params["finetune.min_learning_rate"] == "0.0001"  # null: lora's floor for the set peak
    assert restored.data.metrics == ran_run.data.metrics  # every stage's, read from the restored metrics files
    assert {"pretrain.val_bpb", "finetune.heldout_acc", "evaluate.Q4_K"} <= set(restored.data.metrics)
    assert restored.data.tags["llmpipe.params_defaulted"] == ran_run.data.tags["llmpipe.params_defaulted"]
