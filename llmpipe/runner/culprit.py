"""Name what really ended a stage, not the exception type that carried it to the top.

Libraries wrap the error that matters: torch.distributed.checkpoint reports a full disk as
`CheckpointException ranks:dict_keys([0])` with the `OSError` in its `failures`, a `raise X from exc` puts
it in `__cause__`, an error while handling another in `__context__`. `culprit` walks all of these (and
exception groups) to the root cause and says it as the user needs it: the file it was on and the operating
system's words,

    checkpoints/pretrain/3f.../.step-0000010.tmp-4242/sharded/shard-00001-model-00001-of-00001.safetensors:
    [Errno 27] File too large (writing; raised as CheckpointException)

An `OSError` anywhere in the chain is the root cause (the disk, the permissions, the file system are what the
user can act on). Its file is the error's own `filename` (an `open` that failed) or, for a failed read or write
on a file already open (which carries no name), the file object or path the innermost frames of its
traceback were working on.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

NOT_A_STAGE_DEPENDENCY = "the root cause of an unexpected exception, for the one line"  # see llmpipe.generate.code_deps

_LIBRARY_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # Rust's io::Error (safetensors, tokenizers)
_PATH_NAMES = ("path", "file", "filename", "file_name", "file_path", "target", "destination", "source")


def _wrapped(exc: BaseException, implicit: bool = True) -> Iterator[BaseException]:
    """The exceptions `exc` carries: its cause, its context (if `implicit`), those of a group, those a wrapper keeps
    by rank (torch.distributed.checkpoint's `failures`: {rank: (exception, stack)})."""
    for linked in (exc.__cause__, exc.__context__ if implicit else None):
        if linked is not None:
            yield linked
    for inner in getattr(exc, "exceptions", None) or ():
        if isinstance(inner, BaseException):
            yield inner
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, BaseException):
                yield inner


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it carries, depth first, each once."""
    seen: dict[int, BaseException] = {}
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen[id(current)] = current
        pending.extend(reversed(list(_wrapped(current))))
    return list(seen.values())


def root_cause(exc: BaseException) -> BaseException:
    """The deepest `OSError` in the chain if there is one, or one a compiled library names in its message
    (`... (os error 27)`); otherwise the innermost exception reached through
    explicit causes (`raise ... from`) and wrappers (groups, per-rank failures), not through an implicit context
    (an error while handling another, which is usually the one to report)."""
    os_errors = [inner for inner in chain(exc) if isinstance(inner, OSError)]
    if os_errors:
        return os_errors[-1]
    for inner in reversed(chain(exc)):  # an OS error a compiled library put in its message (safetensors' writer)
        number = _LIBRARY_OS_ERROR.search(str(inner))
        if number:
            return OSError(int(number[1]), os.strerror(int(number[1]))).with_traceback(inner.__traceback__)
    current = exc
    while True:
        inner = next(_wrapped(current, implicit=False), None)
        if inner is None:
            return current
        current = inner


def _shown(path) -> str:
    text = os.fsdecode(path)
    try:
        relative = os.path.relpath(text)
    except ValueError:
        return text
    return relative if not relative.startswith("..") else text


def file_in_traceback(exc: BaseException) -> tuple[str, str] | None:
    """(path, "reading" or "writing" or "") of the file the innermost frames of `exc`'s traceback were on: an open
    file object, else a local variable named like a path."""
    frames = []
    trace = exc.__traceback__
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    for frame in reversed(frames):
        values = frame.f_locals
        for value in values.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), (str, bytes)):
                mode = getattr(value, "mode", "")
                return _shown(value.name), "writing" if any(c in mode for c in "wax+") else "reading"
        for name in _PATH_NAMES:
            value = values.get(name)
            if isinstance(value, (os.PathLike, str)) and value and (os.sep in os.fspath(value) or Path(value).exists()):
                return _shown(value), ""
    return None


def describe_os_error(error: OSError) -> str:
    """`<file>: [Errno N] <strerror>` (two files for a rename or a link), as precise as the error allows."""
    reason = f"[Errno {error.errno}] {error.strerror}" if error.errno is not None and error.strerror else \
        (str(error) or type(error).__name__)
    if error.filename is not None:
        files = _shown(error.filename) + (f" -> {_shown(error.filename2)}" if error.filename2 is not None else "")
        return f"{files}: {reason}"
    found = file_in_traceback(error)
    if found:
        path, action = found
        return f"{path}: {reason}" + (f" ({action})" if action else "")
    return reason


def culprit(exc: BaseException) -> str:
    """One line: the root cause of `exc` with the file it concerns, and the wrapper it came in when that is
    another type (`... (raised as CheckpointException)`)."""
    root = root_cause(exc)
    if isinstance(root, OSError):
        line = describe_os_error(root)
    else:
        message = next((text.strip() for text in str(root).splitlines() if text.strip()), "")
        line = f"{type(root).__name__}" + (f": {message[:300]}" if message else "")
    if root is not exc:
        line += f" (raised as {type(exc).__name__})"
    return line
