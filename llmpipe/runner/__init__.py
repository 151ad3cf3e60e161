"""Running a stage: the entry point DVC calls, what guards it, process launch, progress lines."""
