"""Reports: CSV and JSON for DVC plots and metrics, Markdown for people, PNG plots."""
