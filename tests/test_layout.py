"""The package's shape: imports that only point down the layers, so a reader never climbs back up; outputs DVC can
share; names and functions a reader can follow."""

import ast
from pathlib import Path

import yaml
from harness import ROOT

from llmpipe.config import layout
from llmpipe.generate import code_deps

# Lowest first; a module may import from its own layer or any layer before it.
LAYERS = [
    {"llmpipe.errors", "llmpipe.atomic"},
    {"llmpipe.config"},
    {"llmpipe.tracking"},
    {"llmpipe.runner"},
    {"llmpipe.model", "llmpipe.text"},
    {"llmpipe.data"},
    {"llmpipe.eval"},
    {"llmpipe.train"},
    {"llmpipe.gguf", "llmpipe.hf", "llmpipe.serve", "llmpipe.report", "llmpipe.sweep"},
    {"llmpipe.generate", "llmpipe.cli"},
]


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def module_file(name: str) -> Path | None:
    return code_deps.module_file(ROOT, name)


def imported_modules(path: Path) -> set[str]:
    return code_deps.imported_modules(ROOT, path)


def test_imports_only_point_down_the_layers():
    package = ROOT / "llmpipe"
    climbing = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "llmpipe":
            continue
        for target in imported_modules(path):
            if layer_of(target) > layer_of(module):
                climbing.append(f"{module} imports {target}")
    assert not climbing, climbing


def test_every_llmpipe_module_sits_in_a_layer():
    for path in (ROOT / "llmpipe").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts != ("llmpipe", "__init__"):
            layer_of(".".join(parts[:-1] if parts[-1] == "__init__" else parts))


def test_every_output_is_in_the_dvc_cache_so_the_run_cache_holds_every_stage():
    """No output is `cache: false`, metrics and plot data included: DVC leaves a stage that has a `cache: false`
    output other than a metric or a plot out of the run-cache (dvc/stage/__init__.py, `no_cache_outs`), and never
    pushes a `cache: false` file to a remote, so a teammate's `dvc repro --pull` or `dvc exp run` could not restore
    the stage from the team's remote (tests/test_team_sharing.py). Every output is git-ignored (by /.gitignore, so
    DVC writes no .gitignore of its own in reports/)."""
    import subprocess

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text("utf-8"))["stages"]
    outputs = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path, options = (next(iter(entry.items())) if isinstance(entry, dict) else (entry, {}))
                assert (options or {}).get("cache", True) is not False, f"{path}: cache: false"
                outputs.add(path)
    assert {str(layout.EVALUATE_METRICS), str(layout.VARIANTS_TABLE)} <= outputs
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, capture_output=True, text=True,
                             input="\n".join(sorted(outputs))).stdout.split()
    assert set(ignored) == outputs


def test_package_init_files_hold_no_code():
    """__init__.py files run on every import but are no stage's dependency: a docstring (and the version) only."""
    for path in (ROOT / "llmpipe").rglob("__init__.py"):
        body = ast.parse(path.read_text("utf-8")).body
        code = [node for node in body[1:] if not (isinstance(node, ast.Assign) and node.targets[0].id == "__version__")]
        assert isinstance(body[0], ast.Expr) and not code, path


def test_no_module_calls_another_modules_private_names():
    """Reaching into another module's internals (`atomic._replace`) couples them invisibly: only public names
    cross module boundaries."""
    offences = []
    for path in [*(ROOT / "llmpipe").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        modules = imported_names(path)
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmpipe"):
                offences += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                             if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in modules:
                offences.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not offences, offences


def imported_names(path: Path) -> set[str]:
    """The names a file binds to llmpipe modules (`from llmpipe import atomic` binds atomic)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmpipe"):
            names |= {a.asname or a.name for a in node.names if module_file(f"{node.module}.{a.name}")}
    return names


def test_no_params_key_is_spelled_in_two_places():
    """Each params key is read through its settings dataclass: a dotted key (or section) as a string literal
    appears at most once in llmpipe/ and stages/."""
    from llmpipe.config.params import schema_keys

    keys = schema_keys(ROOT / "conf")
    sections = {".".join(key.split(".")[:depth]) for key in keys for depth in range(1, key.count(".") + 1)}
    seen: dict[str, list[str]] = {}
    for path in [*(ROOT / "llmpipe").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                    and node.value in keys | sections:
                seen.setdefault(node.value, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not {key: places for key, places in seen.items() if len(places) > 1}


def test_no_function_is_longer_than_80_lines():
    """Long routines hide several concerns: split them (the training loop is a class of one method per step part)."""
    long = []
    for path in [*(ROOT / "llmpipe").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long
