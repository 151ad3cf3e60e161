"""What a stage's MLflow run records besides params and metrics: the datasets it read, and system metrics."""

import time

from llmpipe.pipeline.tracking import StageRun


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
