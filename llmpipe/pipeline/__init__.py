"""Pipeline plumbing: what makes a script a DVC stage (params.yaml keys dvc.yaml declares, the Hydra entry
point, one-line errors), where artifacts live (layout), atomic writes, processes
(torchrun launch, process group), and MLflow tracking (store, provenance, stage runs). Imports nothing
else from llmpipe."""
