"""Atomic outputs: write to a temporary sibling, then rename into place.

A stage that fails or is killed therefore never leaves a half-written file or directory
at an output path, where DVC or a later stage could take it for a valid result.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

TEMP_MARKER = ".tmp-"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete leftovers of earlier killed writes to `path` (`.name.tmp-PID` siblings)."""
    path = Path(path)
    for leftover in glob.glob(str(path.with_name(f".{path.name}{TEMP_MARKER}*"))):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


def _replace(temp: Path, final: Path) -> None:
    if final.is_dir() and not final.is_symlink():
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)


@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `path`, on failure it vanishes.

    With `directory=True` the temporary path is an empty directory, renamed as a whole.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    temp = _temp_sibling(final)
    if directory:
        temp.mkdir()
    try:
        yield temp
        publish(temp, final)
    except BaseException:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
        raise


def publish(temp: Path, final: Path) -> None:
    """Make a finished temporary file or directory `final`: flushed to disk, then renamed into place (an existing
    directory at `final` is replaced whole)."""
    if temp.is_dir():
        _fsync_tree(temp)
    elif temp.exists():
        _fsync_file(temp)
    _replace(temp, final)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            _fsync_file(file)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_text(obj, indent: int = 2, sort_keys: bool = True) -> str:
    """The one JSON format of the files the pipeline writes: indented, keys sorted, UTF-8 as is, a final newline."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def write_json(path: str | Path, obj) -> None:
    write_text(path, json_text(obj))
