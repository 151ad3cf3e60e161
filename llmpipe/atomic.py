"""Atomic outputs: write to a temporary sibling, then rename into place.

A stage that fails or is killed therefore never leaves a half-written file or directory
at an output path, where DVC or a later stage could take it for a valid result.

Every temporary path is `.<name>.tmp-<PID>` (a directory being replaced is moved aside as `.<name>.old-<PID>`):
the process that owns it is in its name, so what a killed process left (SIGKILL, out of memory, a power cut)
is told apart from what a live one is writing, and `remove_orphaned_temporaries` deletes it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

TEMP_MARKER = ".tmp-"


OWNED_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")  # a temporary path, the owner's PID in its name


def temp_sibling(path: str | Path) -> Path:
    """The temporary path this process writes `path` through."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")


def temporaries_of(path: str | Path) -> list[Path]:
    """The temporary siblings of `path` there are now (this process's and others')."""
    path = Path(path)
    return [Path(name) for name in sorted(glob.glob(glob.escape(str(path.with_name(f".{path.name}{TEMP_MARKER}")))
                                                    + "*"))]


def _remove(path: str | Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete leftovers of earlier killed writes to `path` (`.name.tmp-PID` siblings)."""
    for leftover in temporaries_of(path):
        _remove(leftover)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user counts: it may be writing)."""
    if pid == os.getpid():
        return True
    if pid <= 0:  # not a process (kill(0) would signal this process's group)
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def remove_orphaned_temporaries(roots: list[str | Path]) -> list[Path]:
    """Delete, under each of `roots`, every temporary path whose owner process is gone; returns them. Only
    processes of this machine are checked: the repository is written by one machine at a time (under several
    nodes, by global rank 0, which cleans before it writes)."""
    removed = []
    for root in roots:
        for directory, subdirectories, files in os.walk(root):
            for name in [*subdirectories, *files]:
                owner = OWNED_TEMPORARY.match(name)
                if owner and not process_alive(int(owner.group(1))):
                    _remove(os.path.join(directory, name))
                    removed.append(Path(directory, name))
            subdirectories[:] = [name for name in subdirectories if not OWNED_TEMPORARY.match(name)]
    return removed


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
    temp = temp_sibling(final)
    if directory:
        temp.mkdir()
    try:
        yield temp
        publish(temp, final)
    except BaseException:
        _remove(temp)
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
