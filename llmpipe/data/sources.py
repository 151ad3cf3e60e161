"""The user's own pretraining text: local files by glob, or a Hugging Face dataset.

Both go through `datasets.load_dataset` (builders "text", "json", "parquet" for local files; a dataset
name for the Hub), so the code path the tests exercise with local files is the one a Hub dataset takes.
Documents are streamed, in batches of the text column, never held as a list: local files are read with
`streaming=True` (no Arrow copy), a Hub dataset with `data.streaming` (true is the way for corpora larger
than memory or disk; false downloads the split and reads its Arrow files batch by batch). Memory therefore
does not grow with the corpus. Local files are checked first, also streamed, so that bad bytes or bad JSON
get a `file:line` error: each file once by its real path (a symlink loop repeats nothing), binary content
(a NUL byte) refused from the file's first bytes, and no line or document longer than 64 MiB (a file without
newlines is not read whole into memory).
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from llmpipe.data.jsonl import bounded_lines, iterate_records
from llmpipe.errors import InputDataError

BUILDER_BY_SUFFIX = {".txt": "text", ".md": "text", ".text": "text",
                     ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TXT_SAMPLE_BY = ("document", "paragraph", "line")
BATCH_ROWS = 1000  # rows read at a time
MAX_DOCUMENT_BYTES = 64 << 20  # the longest text document: `datasets` holds one whole in memory
BINARY_PROBE_BYTES = 8192  # the start of a file where a NUL byte says it is binary (as git decides)


def expand_paths(patterns: list[str], key: str) -> list[Path]:
    """The files the globs match, each once: by its real path, so a file reached twice (two globs, a symlink, a
    directory symlink loop such as `d/loop -> ..`) is read once, under the first name it was matched by."""
    files: dict[str, Path] = {}
    for pattern in patterns:
        matched = matching_files(pattern)
        if not matched:
            raise InputDataError(f"{key}: no file matches {pattern!r}")
        for file in matched:
            files.setdefault(os.path.realpath(file), file)
    unique = list(files.values())
    for file in unique:
        if file.suffix.lower() not in BUILDER_BY_SUFFIX:
            raise InputDataError(f"{file}: unsupported file type {file.suffix!r}; expected one of "
                                 + ", ".join(sorted(BUILDER_BY_SUFFIX)))
    return unique


def matching_files(pattern: str) -> list[Path]:
    """The files a glob matches, sorted. `**` (any number of directories) walks each directory once, by its real
    path (glob.glob follows directory symlinks round a loop, and through two loops explores exponentially many
    paths); as in glob, `*` and `**` do not match names starting with a dot."""
    if "**" not in pattern:
        return sorted(Path(p) for p in glob.glob(pattern) if os.path.isfile(p))
    parts = pattern.split("/")
    literal = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    top = "/".join(parts[:literal]) or ("/" if pattern.startswith("/") else ".")
    matcher = re.compile(glob_regex(pattern.removeprefix("./")))
    visited, found = set(), []
    for root, directories, names in os.walk(top, followlinks=True):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in visited:
            directories[:] = []
            continue
        visited.add((status.st_dev, status.st_ino))
        directories[:] = sorted(d for d in directories if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = os.path.join(root, name).removeprefix("./")
            if matcher.fullmatch(path) and os.path.isfile(path):
                found.append(Path(path))
    return found


def glob_regex(pattern: str) -> str:
    """A glob pattern as a regular expression over '/'-separated paths: `**/` any directories (none too), `*` and
    `?` within one name, `[...]` a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _check_text_file(path: Path, sample_by: str) -> None:
    """UTF-8 (file:line), not binary (a NUL byte: file:line), and no document longer than MAX_DOCUMENT_BYTES as
    `sample_by` cuts the file (a line, a paragraph or the whole file), read a bounded line at a time."""
    document_bytes, document_line = 0, 1
    with open(path, "rb") as handle:
        for number, raw in bounded_lines(handle, path):
            nul = raw.find(b"\0")
            if nul >= 0:
                raise InputDataError(f"{path}:{number}: binary content (a NUL byte at byte {nul} of the line); text "
                                     "files must be UTF-8 text")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputDataError(f"{path}:{number}: not valid UTF-8 (byte {exc.start} of the line)") from None
            if sample_by == "line" or (sample_by == "paragraph" and not raw.strip()):
                document_bytes, document_line = 0, number + 1
            document_bytes += len(raw)
            if document_bytes > MAX_DOCUMENT_BYTES:
                raise InputDataError(f"{path}:{document_line}: a document (data.txt_sample_by={sample_by}) longer than "
                                     f"{MAX_DOCUMENT_BYTES >> 20} MiB starts here; split the text, or sample by "
                                     "paragraph or line")


def _check_jsonl_file(path: Path, text_column: str) -> None:
    with open(path, "rb") as handle:
        if handle.read(4096).lstrip().startswith(b"["):
            raise InputDataError(f"{path}: a JSON array; local files must be JSON Lines (one JSON object per line)")
    records = 0
    for where, record in iterate_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
            raise InputDataError(f"{where}: expected an object with a string field {text_column!r} "
                                 f"(data.text_column)")
        records += 1
    if not records:
        raise InputDataError(f"{path}: no JSON records (only blank lines)")


def _check_parquet_file(path: Path, text_column: str) -> None:
    """The text column exists, holds strings, and has no nulls: the checks JSONL lines get."""
    # deferred: pyarrow takes ~0.15 s to import; only Parquet input needs it
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if text_column not in schema.names:
            raise InputDataError(f"{path}: no column {text_column!r} (data.text_column); columns: {schema.names}")
        column_type = schema.field(text_column).type
        if pa.types.is_dictionary(column_type):  # e.g. a pandas categorical: strings stored once each
            column_type = column_type.value_type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
                or getattr(pa.types, "is_string_view", lambda t: False)(column_type)):
            raise InputDataError(f"{path}: column {text_column!r} (data.text_column) holds {column_type}, "
                                 "expected strings")
        rows = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_column]):  # a batch at a time
            column = batch.column(0)
            if column.null_count:
                first = rows + column.is_null().to_pylist().index(True)
                raise InputDataError(f"{path}: row {first + 1}: {text_column!r} (data.text_column) is null; "
                                     "expected a string")
            rows += len(column)
    except (pa.ArrowException, OSError) as exc:
        raise InputDataError(f"{path}: not a readable Parquet file ({exc})".splitlines()[0]) from None
    if rows == 0:
        raise InputDataError(f"{path}: no rows")


CHECKS = {"text": lambda path, column, sample_by: _check_text_file(path, sample_by),
          "json": lambda path, column, sample_by: _check_jsonl_file(path, column),
          "parquet": lambda path, column, sample_by: _check_parquet_file(path, column)}


def check_file(path: Path, builder: str, text_column: str, txt_sample_by: str = "paragraph") -> None:
    """Before `datasets` reads a file: it is not empty, and its bytes, records and text column are valid,
    so an error names the file (and the line or row) instead of a builder's generic failure."""
    if path.stat().st_size == 0:
        raise InputDataError(f"{path}: empty file (0 bytes); remove it or leave it out of data.paths")
    if builder != "parquet":  # binary content (an image, an archive, a file of zeros): said at once, from its start
        with open(path, "rb") as handle:
            nul = handle.read(BINARY_PROBE_BYTES).find(b"\0")
        if nul >= 0:
            raise InputDataError(f"{path}: binary content (a NUL byte at byte {nul}); text and JSONL files must be "
                                 "UTF-8 text")
    CHECKS[builder](path, text_column, txt_sample_by)


def root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain, as "Type: message"."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"


def stream_column(dataset, text_column: str, source: str, read_error: str) -> Iterator[str]:
    """The text column of a `datasets` Dataset or IterableDataset, batch by batch. `read_error` starts the
    message when reading fails (a streamed builder only reads its files while it is iterated)."""
    batches = dataset.iter(batch_size=BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # datasets wraps the cause ("An error occurred while generating the dataset")
            raise InputDataError(f"{read_error}: {root_cause(exc)}".splitlines()[0]) from None
        if text_column not in batch:
            raise InputDataError(f"{source}: no column {text_column!r} (data.text_column); columns: {sorted(batch)}")
        yield from batch[text_column]


def read_local_documents(patterns: list[str], key: str, text_column: str, txt_sample_by: str) -> Iterator[str]:
    """Documents from local text/JSONL/Parquet files, streamed; one document per file, paragraph or line
    for text. The paths (the params `key`'s globs) are expanded now, so an unmatched glob fails at once; the
    files are read as iterated."""
    files = expand_paths(patterns, key)
    return _stream_local_documents(files, text_column, txt_sample_by)


def _stream_local_documents(files: list[Path], text_column: str, txt_sample_by: str) -> Iterator[str]:
    import datasets  # deferred: see read_hub_documents

    for builder, group in itertools.groupby(files, key=lambda f: BUILDER_BY_SUFFIX[f.suffix.lower()]):
        group = list(group)
        for file in group:
            check_file(file, builder, text_column, txt_sample_by)
        options = {"sample_by": txt_sample_by} if builder == "text" else {}
        names = ", ".join(str(f) for f in group)
        try:
            dataset = datasets.load_dataset(builder, data_files=[str(f) for f in group], split="train",
                                            streaming=True, **options)
        except Exception as exc:
            raise InputDataError(f"{names}: could not be read as {builder}: {root_cause(exc)}".splitlines()[0]) from None
        yield from stream_column(dataset, "text" if builder == "text" else text_column, str(group[0]),
                                 f"{names}: could not be read as {builder}")


def read_hub_documents(name: str, config: str | None, split: str, text_column: str, streaming: bool,
                       max_documents: int | None, revision: str | None = None,
                       data_files: list[str] | None = None) -> Iterator[str]:
    """Documents from `datasets.load_dataset(name, config, split=...)`, streamed (at most `max_documents`);
    needs the network for Hub names. Without `streaming` the split is downloaded (and prepared) now."""
    # deferred: datasets takes ~0.7 s to import, which the embedded data does not need, and it reads
    # HF_DATASETS_DISABLE_PROGRESS_BARS when imported, which the stage's entry point sets after the imports
    import datasets

    source = f"data.name={name}"
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=streaming, revision=revision,
                                        data_files=data_files)
    except Exception as exc:
        raise InputDataError(f"{source}: could not load dataset: {exc}".splitlines()[0]) from None
    return itertools.islice(stream_column(dataset, text_column, source, f"{source}: could not read dataset"),
                            max_documents)


def clean_documents(documents: Iterable, source: str) -> Iterator[str]:
    """Strip, drop empty documents, as they stream by; an empty corpus is an error (once it has streamed)."""
    kept = 0
    for document in documents:
        text = document.lstrip("\ufeff").strip() if isinstance(document, str) else ""
        if text:
            kept += 1
            yield text
    if not kept:
        raise InputDataError(f"{source}: the corpus is empty (no non-blank document)")
