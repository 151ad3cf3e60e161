"""Read conf/*.yaml as the settings dataclasses see it: each key's value and its comment.

A key's comment is the text after `#` on its line, continued on the comment-only lines below it whose `#`
sits in the same column."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from llmpipe.config.params import param_fields

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<rest>.*)$")


def key_comments(path: Path) -> dict[str, str]:
    """Dotted key → comment, for every key line of a YAML file (indentation gives the nesting)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last_key, last_column = None, None
    for line in path.read_text("utf-8").splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#"):
            if last_key is not None and len(line) - len(stripped) == last_column:
                comments[last_key] += " " + stripped[1:].strip()
            continue
        match = KEY_LINE.match(line)
        last_key = None
        if not match or match["key"] == "defaults":
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([name for _, name in stack] + [match["key"]])
        stack.append((indent, match["key"]))
        column = line.find(" #", len(match["indent"]) + len(match["key"]) + 1)
        if column >= 0:
            comments[dotted] = line[column + 2:].strip()
            last_key, last_column = dotted, column + 1
        else:
            comments[dotted] = ""
    return comments


def expected_docs(cls: type, prefix: str = "") -> dict[str, tuple[str, object]]:
    """Dotted key → (doc, default) of every param field of a settings dataclass, nested ones included."""
    found = {}
    hints = typing.get_type_hints(cls)
    for field in param_fields(cls):
        key = f"{prefix}{field.name}"
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        found[key] = (field.metadata["doc"], default)
        if dataclasses.is_dataclass(hints[field.name]):
            found.update(expected_docs(hints[field.name], key + "."))
    return found


def yaml_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text("utf-8")) or {}
