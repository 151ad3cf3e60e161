"""JSONL, the pipeline's file format for text and examples: one JSON value per line.

- `iterate_records(path)` / `read_records(path)`: every value with its place ("file:line"), for user
  files, so each error names the file and line (not valid UTF-8, not valid JSON, with the column inside
  the line); the first streams them (constant memory, for corpora larger than memory);
- `iterate_rows(path)` / `read_rows(path)`: the values alone, for files the prepare stage wrote;
- `row_line(row)` / `write_rows(path, rows)`: one compact JSON object per line, UTF-8 (callers make it
  atomic).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from llmpipe.errors import InputDataError

MAX_LINE_BYTES = 64 << 20  # the longest line (of a user's file) held in memory: a file without newlines is not one line


def bounded_lines(handle: BinaryIO, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line of a file opened in binary mode, none longer than MAX_LINE_BYTES (a longer
    one is refused once that much is read, naming the file and line), so memory stays bounded whatever the file."""
    for number in itertools.count(1):
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise InputDataError(f"{path}:{number}: a line longer than {MAX_LINE_BYTES >> 20} MiB; split it into "
                                 "lines (or documents) of reasonable size")
        yield number, raw


def iterate_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """("file:line", value) for every non-blank line, one by one; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: file not found")
    with open(path, "rb") as handle:
        for number, raw in bounded_lines(handle, path):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputDataError(f"{where}: not valid UTF-8 (byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip())  # columns count within the line
            except json.JSONDecodeError as exc:
                raise InputDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield where, value


def read_records(path: str | Path) -> list[tuple[str, object]]:
    """[("file:line", value)] for every non-blank line (a small file: fine-tuning examples)."""
    return list(iterate_records(path))


def iterate_rows(path: str | Path, string_field: str | None = None) -> Iterator[dict]:
    """The values of a file the pipeline wrote, one by one; a missing file names the stage to run. With
    `string_field`, every row must hold a string there."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or (string_field is not None and not isinstance(row.get(string_field), str)):
                what = "a JSON object" + (f" with a string {string_field!r}" if string_field else "")
                raise InputDataError(f"{path}:{number}: not {what} as the prepare stage writes; rerun it "
                                     "(dvc repro prepare --force)")
            yield row


def read_rows(path: str | Path) -> list[dict]:
    return list(iterate_rows(path))


def row_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_rows(path: str | Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(row_line(row))
