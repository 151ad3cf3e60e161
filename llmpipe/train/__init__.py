"""Training: settings from params, batch sources, the one training loop, checkpoints, FLOPs."""
