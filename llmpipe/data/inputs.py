"""Fingerprints of the paths a user supplies (the user_data folder, a base checkpoint), taken without ever blocking:
DVC hashes these small JSON files instead of the user's paths.

DVC hashes a stage's dependencies by opening every file under them, and does so outside any stage's code: before
the command starts (a missing path then fails only after DVC deleted the stage's outputs, and under `dvc exp run`
params.yaml keeps the experiment's values) and in `dvc status` (a FIFO blocks it for ever). So no stage depends on
a path the user supplies. The `check_inputs` stage, which DVC runs first, every time, walks each such path
here and writes its fingerprint: every regular file's path (relative to the input), size and md5. The stages that
read the input depend on that fingerprint, so they rerun exactly when a file's content, name or presence changes.

Only directories and regular files are read, each opened without blocking. Anything else under an input (a FIFO,
a socket, a device, a symbolic link to a missing path), a file or directory that cannot be read and an input that
does not exist are refused in one line naming the path, before DVC or any stage reads them; the check_inputs
stage's guard then puts back what DVC deleted (its fingerprints) and, under `dvc exp run`, params.yaml. The
other dependencies no stage writes (the stages' code) are checked the same way, without being read, since DVC
would otherwise delete a stage's outputs before finding one missing.

md5s are kept between runs in a cache keyed by each file's size, modification time, inode and change time (as
DVC's own state database keys them), so an unchanged multi-gigabyte checkpoint is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from llmpipe.atomic import write_json
from llmpipe.config.params import declared_outputs
from llmpipe.errors import InputDataError

CHUNK = 1 << 20
PROGRESS_SECONDS = 30  # a line this often while a large file (a checkpoint's weights) is read
KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device"}


def refusal(path: str | Path, what: str, key: str | None) -> InputDataError:
    """One line: the params key the input comes from (if any), the path and what is wrong with it."""
    return InputDataError(f"{key + ': ' if key else ''}{path}: {what}")


def kind(mode: int) -> str:
    return f"{KINDS.get(stat.S_IFMT(mode), 'a special file')}; inputs may hold only regular files and directories"


def os_words(exc: OSError) -> str:
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc)


def regular_files(root: Path, key: str | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to `root`, stat) of every regular file under `root` (itself, if a file), in sorted order,
    following symbolic links but visiting each directory once; anything else is refused (see the module)."""
    try:
        top = os.stat(root)
    except FileNotFoundError:
        raise refusal(root, "does not exist" if not os.path.islink(root) else "a symbolic link to a missing path",
                      key) from None
    except OSError as exc:
        raise refusal(root, f"cannot be read ({os_words(exc)})", key) from None
    if stat.S_ISREG(top.st_mode):
        yield ".", top
        return
    seen: set[tuple[int, int]] = set()

    def walk(directory: Path, status: os.stat_result, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        if (status.st_dev, status.st_ino) in seen:  # a symbolic link back up the tree, or a second link
            return
        seen.add((status.st_dev, status.st_ino))
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise refusal(directory, f"cannot be read ({os_words(exc)})", key) from None
        for name in names:
            path = directory / name
            try:
                entry = os.stat(path)
            except FileNotFoundError:
                raise refusal(path, "a symbolic link to a missing path", key) from None
            except OSError as exc:
                raise refusal(path, f"cannot be read ({os_words(exc)})", key) from None
            if stat.S_ISDIR(entry.st_mode):
                yield from walk(path, entry, f"{prefix}{name}/")
            elif stat.S_ISREG(entry.st_mode):
                yield f"{prefix}{name}", entry
            else:
                raise refusal(path, kind(entry.st_mode), key)

    if not stat.S_ISDIR(top.st_mode):
        raise refusal(root, kind(top.st_mode), key)
    yield from walk(root, top, "")


def file_md5(path: Path, expected: os.stat_result, key: str | None) -> str:
    """md5 of a regular file, opened without blocking; refused if it cannot be read or is no longer that file."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise refusal(path, f"cannot be read ({os_words(exc)})", key) from None
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_ino != expected.st_ino:
            raise refusal(path, "replaced while it was read", key)
        digest, done, said = hashlib.md5(), 0, time.monotonic()
        try:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                done += len(chunk)
                if time.monotonic() - said >= PROGRESS_SECONDS:
                    said = time.monotonic()
                    print(f"check_inputs: {path}: {done / 2**30:.1f} of {status.st_size / 2**30:.1f} GiB read",
                          file=sys.stderr, flush=True)
        except OSError as exc:
            raise refusal(path, f"cannot be read ({os_words(exc)})", key) from None
    return digest.hexdigest()


def check_readable(root: str | Path, key: str | None = None) -> None:
    """Refuse `root` (see the module) unless it and every file under it is a regular file that opens (without
    blocking); nothing is read."""
    for relative, status in regular_files(Path(root), key):
        path = Path(root) if relative == "." else Path(root) / relative
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)))
        except OSError as exc:
            raise refusal(path, f"cannot be read ({os_words(exc)})", key) from None


def source_dependencies(stages: dict) -> dict[str, list[str]]:
    """Stage → the dependencies (dvc.yaml's `deps`) that no stage writes: the code and anything else DVC would hash
    as it is. A dependency inside another stage's output is that stage's to rebuild, so it is not listed."""
    outputs = [path.rstrip("/") for definition in stages.values() for path in declared_outputs(definition or {})]
    return {name: [str(dep) for dep in (definition or {}).get("deps") or []
                   if not any(str(dep) == out or str(dep).startswith(out + "/") for out in outputs)]
            for name, definition in stages.items()}


def stat_key(status: os.stat_result) -> list[int]:
    return [status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns]


def load_cache(path: Path) -> dict[str, list]:
    try:
        cache = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def fingerprint(root: str | Path, key: str | None = None, cache_path: str | Path | None = None) -> dict:
    """{"path": root, "files": [[relative path, size, md5], ...]}: what the stages reading `root` depend on.
    `key` (a params key) is named in refusals; `cache_path` keeps md5s between runs (see the module)."""
    root = Path(root)
    cache = load_cache(Path(cache_path)) if cache_path else {}
    files, fresh = [], {}
    for relative, status in regular_files(root, key):
        path = root if relative == "." else root / relative
        cache_key = os.path.realpath(path)
        known = cache.get(cache_key)
        if isinstance(known, list) and len(known) == 5 and known[:4] == stat_key(status):
            md5 = known[4]
        else:
            md5 = file_md5(path, status, key)
        fresh[cache_key] = [*stat_key(status), md5]
        files.append([relative, status.st_size, md5])
    if cache_path and fresh != {k: cache.get(k) for k in fresh}:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path, {**cache, **fresh})
    return {"path": str(root), "files": files}
