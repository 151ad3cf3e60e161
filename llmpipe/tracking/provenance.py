"""Where a stage run came from: the md5 of its inputs, the git commit, and the pipeline execution
(`dvc repro` or `dvc exp run`) it belongs to. MLflow tags carry these; checkpoints are keyed by them."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path

NOT_A_STAGE_DEPENDENCY = "git commit and input md5s, for MLflow tags"  # see llmpipe.generate.code_deps


def file_md5(path: Path) -> str:
    """md5 of a file's content, read once per process while the file is unchanged (same inode, size and
    modification time): a stage hashes its inputs at start, and registering the model hashes the same weights
    again (gigabytes at 1B). The same key DVC's own state database trusts."""
    stat = os.stat(path)
    return _content_md5(str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _content_md5(path: str, inode: int, size: int, modified_ns: int) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_hashes(paths: list[str]) -> dict[str, str]:
    """md5 of each dependency: a file's content, or for a directory its sorted (path, md5) listing."""
    hashes = {}
    for name in paths:
        path = Path(name)
        if path.is_file():
            hashes[name] = file_md5(path)
        elif path.is_dir():
            listing = hashlib.md5()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                listing.update(f"{file.relative_to(path).as_posix()} {file_md5(file)}\n".encode())
            hashes[name] = listing.hexdigest()
    return hashes


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def pipeline_execution_key() -> str | None:
    """An id shared by all stages of one `dvc repro` / `dvc exp run`, or None for a stage run by hand.

    `LLMPIPE_PIPELINE_ID` wins; an experiment is identified by its name; a plain `dvc repro`
    by the DVC process that runs the stages (pid and start time of the ancestor `dvc` process).
    """
    if os.environ.get("LLMPIPE_PIPELINE_ID"):
        return os.environ["LLMPIPE_PIPELINE_ID"]
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp:{os.environ['DVC_EXP_NAME']}:{os.environ.get('DVC_EXP_BASELINE_REV', '')}"
    try:
        import psutil  # optional: the registered model's environment (registry.SERVING_PACKAGES) has none

        process = psutil.Process().parent()
        while process is not None:
            argv = process.cmdline()
            if any(Path(arg).name in ("dvc", "dvc.exe") or arg == "dvc" for arg in argv[:3]):
                return f"dvc:{process.pid}:{process.create_time():.3f}"
            process = process.parent()
    except Exception:  # process table not readable: run without a parent
        return None
    return None


def stage_tags(stage: str, hashes: dict[str, str]) -> dict[str, str]:
    """The MLflow tags of a stage run: DVC stage, git commit, DVC experiment and baseline, pipeline execution,
    md5 of each input."""
    tags = {"dvc.stage": stage, "llmpipe.kind": "stage"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    key = pipeline_execution_key()
    if key:
        tags["llmpipe.pipeline"] = key
    for path, digest in hashes.items():
        tags[f"input.md5.{path}"] = digest
    return tags
