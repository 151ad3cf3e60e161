"""MLflow tracking: a run per stage, the pipeline execution's run, where runs are stored, provenance tags."""
