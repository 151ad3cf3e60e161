"""A stage's code dependencies: its scripts and every llmpipe module they import, found by reading the source
(nothing is imported). A module that cannot change what a stage writes (the entry point's plumbing, MLflow
tracking, progress lines) says so itself, with a module-level

    NOT_A_STAGE_DEPENDENCY = "MLflow runs"

and is left out: a change to it reruns nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PLUMBING_MARKER = "NOT_A_STAGE_DEPENDENCY"


def module_file(root: Path, name: str) -> Path | None:
    """The file of module `name` (llmpipe.a.b → llmpipe/a/b.py or llmpipe/a/b/__init__.py) under `root`, or None."""
    path = root.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(root: Path, path: Path, runtime_only: bool = False) -> set[str]:
    """The llmpipe modules a file imports, at top level or inside functions (`from llmpipe.a import b` counts
    llmpipe.a and, when b is a module, llmpipe.a.b); `runtime_only` leaves out `if TYPE_CHECKING:` imports."""
    tree = ast.parse(path.read_text("utf-8"))
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("llmpipe.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "llmpipe":
            found |= {f"llmpipe.{alias.name}" for alias in node.names if alias.name != "__version__"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmpipe."):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(root, f"{node.module}.{alias.name}")}
    return found


def import_closure(root: Path, scripts: list[Path]) -> set[Path]:
    """Every llmpipe file that running `scripts` imports (package __init__ files included)."""
    seen: set[Path] = set()
    todo = list(scripts)
    while todo:
        for name in imported_modules(root, todo.pop(), runtime_only=True):
            parts = name.split(".")
            for length in range(1, len(parts) + 1):
                path = module_file(root, ".".join(parts[:length]))
                if path and path not in seen:
                    seen.add(path)
                    todo.append(path)
    return seen


def plumbing_reason(path: Path) -> str | None:
    """Why a module is no stage's dependency (its NOT_A_STAGE_DEPENDENCY), or None."""
    for node in ast.parse(path.read_text("utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == PLUMBING_MARKER
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def command_code(root: Path, command: str) -> list[Path]:
    """The files a stage's command runs: its scripts, and the modules it runs with `python -m`."""
    words = command.split()
    scripts = [root / word for word in words if word.endswith(".py")]
    modules = [module_file(root, words[i + 1]) for i, word in enumerate(words[:-1]) if word == "-m"]
    return scripts + [path for path in modules if path]


def code_dependencies(root: Path, command: str) -> list[str]:
    """What dvc.yaml lists as a stage's code: its scripts and everything they import, but __init__ files
    (docstrings only) and plumbing; sorted, relative to `root`."""
    scripts = command_code(root, command)
    files = import_closure(root, scripts) | set(scripts)
    return sorted(str(path.relative_to(root)) for path in files
                  if path.name != "__init__.py" and plumbing_reason(path) is None)
