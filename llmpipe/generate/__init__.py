"""What is generated from the facts written once by hand: conf/, params.yaml, dvc.yaml and docs/params.md,
written by `llmpipe compose` and checked by `llmpipe compose --check`."""
