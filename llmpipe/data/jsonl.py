"""JSONL, the pipeline's file format for text and examples: one JSON value per line.

- `read_records(path)`: every value with its place ("file:line"), for user files, so each error names
  the file and line (not valid UTF-8, not valid JSON, with the column inside the line);
- `read_rows(path)`: the values alone, for files the prepare stage wrote;
- `write_rows(path, rows)`: one compact JSON object per line, UTF-8 (callers make it atomic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from llmpipe.pipeline.errors import InputDataError


def read_records(path: str | Path) -> list[tuple[str, object]]:
    """[("file:line", value)] for every non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: file not found")
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputDataError(f"{where}: not valid UTF-8 (byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                records.append((where, json.loads(line.rstrip())))  # columns count within the line
            except json.JSONDecodeError as exc:
                raise InputDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return records


def iterate_rows(path: str | Path) -> Iterator[dict]:
    """The values of a file the pipeline wrote, one by one; a missing file names the stage to run."""
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
            if not isinstance(row, dict):
                raise InputDataError(f"{path}:{number}: not a JSON object as the prepare stage writes; rerun it "
                                     "(dvc repro prepare --force)")
            yield row


def read_rows(path: str | Path) -> list[dict]:
    return list(iterate_rows(path))


def write_rows(path: str | Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
