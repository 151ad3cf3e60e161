"""Evaluation: language-model metrics, QA accuracy through the generation engine, variants side by side."""
