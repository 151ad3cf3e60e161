"""What a stage's MLflow run records besides params and metrics: the datasets it read, and system metrics."""

import time

from llmpipe.tracking.stage_run import StageRun


def test_a_stage_run_lists_its_data_inputs_and_samples_system_metrics(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    hashes = {"data/tokens": "0123456789abcdef0123456789abcdef", "stages/pretrain.py": "f" * 32}
    with StageRun("pretrain", {"pretrain.max_steps": 5}, hashes) as run:
        time.sleep(2.0)
    stored = mlflow.tracking.MlflowClient(uri).get_run(run.run_id)
    datasets = [(d.dataset.name, d.dataset.digest) for d in stored.inputs.dataset_inputs]
    assert datasets == [("data/tokens", "0123456789abcdef0123456789abcdef")]  # code files are not datasets
    assert stored.data.tags["input.md5.stages/pretrain.py"] == "f" * 32
    assert any(key.startswith("system/cpu_utilization") for key in stored.data.metrics), stored.data.metrics
    assert stored.info.status == "FINISHED"


def test_a_moved_repository_keeps_its_runs_and_writes_artifacts_into_its_new_place(tmp_path, monkeypatch):
    import mlflow

    def stage_run_in(repo):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # no server: the repository's own store
        monkeypatch.setenv("DVC_ROOT", str(repo))
        repo.mkdir(exist_ok=True)
        (repo / "notes.txt").write_text(f"written in {repo.name}\n")
        with StageRun("prepare", {"seed": 1}, {}) as run:
            run.log_artifact(repo / "notes.txt")
        return run.run_id

    first = stage_run_in(tmp_path / "old")
    (tmp_path / "old").rename(tmp_path / "new")
    second = stage_run_in(tmp_path / "new")

    assert not (tmp_path / "old").exists(), "the moved repository wrote into the directory it was moved from"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'new/.mlflow/mlflow.db'}")
    for run_id in (first, second):
        assert client.get_run(run_id).info.artifact_uri.startswith((tmp_path / "new/.mlflow/artifacts").as_uri())
        downloaded = client.download_artifacts(run_id, "notes.txt", str(tmp_path))
        assert open(downloaded).read().startswith("written in")
