"""The package's shape: each artifact named once (llmpipe.config.layout agrees with dvc.yaml), and
imports that only point down the layers, so a reader never climbs back up."""

import ast
from pathlib import Path

import yaml
from conftest import ROOT

from llmpipe.config import layout

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
    {"llmpipe.cli"},
]
# Modules a stage imports that cannot change what it writes, so they are not its DVC dependencies (a change to
# them reruns nothing): the entry point's plumbing, MLflow tracking, process launch, progress lines.
PLUMBING = {
    "llmpipe/runner/stage.py": "the entry point: reads params.yaml, opens the MLflow run, one-line errors",
    "llmpipe/tracking/stage_run.py": "MLflow runs",
    "llmpipe/tracking/pipeline_run.py": "the pipeline execution's MLflow run",
    "llmpipe/tracking/store.py": "where MLflow stores runs",
    "llmpipe/tracking/provenance.py": "git commit and input md5s, for MLflow tags",
    "llmpipe/tracking/orphans.py": "closes the MLflow runs of killed processes",
    "llmpipe/runner/restore.py": "puts the previous outputs back when a stage fails",
    "llmpipe/runner/guard.py": "whatever ends a stage: outputs put back, one line, exit status",
    "llmpipe/runner/culprit.py": "the root cause of an unexpected exception, for the one line",
    "llmpipe/config/compose.py": "restore's params.yaml, as conf/ composes it",
    "llmpipe/errors.py": "exception types",
    "llmpipe/runner/launch.py": "process launch (torchrun)",
    "llmpipe/train/progress.py": "progress lines",
    "llmpipe/runner/heartbeat.py": "progress lines of long loops",
}


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def module_file(name: str) -> Path | None:
    """The file of module `name` (llmpipe.a.b → llmpipe/a/b.py or llmpipe/a/b/__init__.py), or None."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, runtime_only: bool = False) -> set[str]:
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
                      if module_file(f"{node.module}.{alias.name}")}
    return found


def import_closure(roots: list[Path]) -> set[str]:
    """Every llmpipe file that running `roots` imports (package __init__ files included), relative to ROOT."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        for name in imported_modules(todo.pop(), runtime_only=True):
            parts = name.split(".")
            for length in range(1, len(parts) + 1):
                path = module_file(".".join(parts[:length]))
                if path and path not in seen:
                    seen.add(path)
                    todo.append(path)
    return {str(path.relative_to(ROOT)) for path in seen}


def stage_code(stage: dict) -> list[Path]:
    """The files a stage's command runs: its scripts, and the modules it runs with `python -m`."""
    words = stage["cmd"].split()
    scripts = [ROOT / word for word in words if word.endswith(".py")]
    modules = [module_file(words[i + 1]) for i, word in enumerate(words[:-1]) if word == "-m"]
    return scripts + [path for path in modules if path]


def code_dependencies(stage: dict) -> set[str]:
    """What dvc.yaml must list as a stage's code: its scripts and everything they import, but plumbing."""
    roots = stage_code(stage)
    imported = import_closure(roots) | {str(path.relative_to(ROOT)) for path in roots}
    return {path for path in imported if not path.endswith("__init__.py") and path not in PLUMBING}


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


def test_dvc_yaml_names_the_artifacts_of_the_layout_module():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text("utf-8"))["stages"]

    def paths(stage: str, kind: str) -> set[str]:
        return {str(entry) if not isinstance(entry, dict) else next(iter(entry))
                for entry in stages[stage].get(kind) or []}

    expected_outs = {
        "prepare": {layout.PREPARED},
        "train_tokenizer": {layout.TOKENIZER, layout.TOKENIZER_REPORT, layout.TOKENIZER_DETAILS},
        "tokenize": {layout.TOKENS},
        "pretrain": {layout.PRETRAINED, layout.PRETRAIN_REPORTS / layout.TRAIN_CURVE,
                     layout.PRETRAIN_REPORTS / layout.EVAL_CURVE, layout.PRETRAIN_REPORTS / layout.DETAILS,
                     layout.PRETRAIN_REPORTS / layout.TIMINGS},
        "finetune": {layout.FINETUNED, layout.FINETUNE_REPORTS / layout.TRAIN_CURVE,
                     layout.FINETUNE_REPORTS / layout.EVAL_CURVE, layout.FINETUNE_REPORTS / layout.DETAILS,
                     layout.FINETUNE_REPORTS / layout.SAMPLES},
        "quantize": {layout.GGUF, layout.HF_EXPORT, layout.SIZES_TABLE, layout.SIZES_JSON},
        "evaluate": {layout.REPORT, layout.FIGURES, layout.VARIANTS_TABLE},
    }
    expected_metrics = {"train_tokenizer": layout.TOKENIZER_METRICS, "pretrain": layout.PRETRAIN_REPORTS / layout.METRICS,
                        "finetune": layout.FINETUNE_REPORTS / layout.METRICS, "evaluate": layout.EVALUATE_METRICS}
    for stage, outs in expected_outs.items():
        assert paths(stage, "outs") | paths(stage, "plots") == {str(p) for p in outs}, stage
    for stage in stages:
        expected = {str(expected_metrics[stage])} if stage in expected_metrics else set()
        assert paths(stage, "metrics") == expected, stage
    prepared_files = {str(p) for p in [*layout.PRETRAIN_TEXT.values(), *layout.FINETUNE_EXAMPLES.values(),
                                      *layout.QA_FILES.values()]}
    for stage in stages:
        read = {dep for dep in paths(stage, "deps") if dep.startswith(str(layout.PREPARED) + "/")}
        assert read <= prepared_files, (stage, read - prepared_files)
        missing = [dep for dep in paths(stage, "deps") if dep.startswith(("llmpipe/", "stages/"))
                   and not (ROOT / dep).is_file()]
        assert not missing, (stage, missing)


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


def test_every_module_a_stage_imports_is_a_dependency_of_the_stage():
    """A code change reruns every stage whose output it can change: dvc.yaml's code deps of each stage are exactly
    its scripts and their import closure within llmpipe/, but the PLUMBING above."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text("utf-8"))["stages"]
    for name, stage in stages.items():
        listed = {str(dep) for dep in stage.get("deps") or [] if str(dep).startswith(("llmpipe/", "stages/"))}
        needed = code_dependencies(stage)
        assert listed == needed, (f"dvc.yaml stage {name}: missing {sorted(needed - listed)}, "
                                  f"not imported {sorted(listed - needed)}")


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
