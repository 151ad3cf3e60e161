"""Configuration: params.yaml read into checked settings, conf/ composed, every artifact's path."""
