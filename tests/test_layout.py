"""The package's shape: each artifact named once (llmpipe.pipeline.layout agrees with dvc.yaml), and
imports that only point down the layers, so a reader never climbs back up."""

import ast
from pathlib import Path

import yaml
from conftest import ROOT

from llmpipe.pipeline import layout

# Lowest first; a module may import from its own layer or any layer before it.
LAYERS = [
    {"llmpipe.pipeline"},
    {"llmpipe.model", "llmpipe.model_io", "llmpipe.model_size", "llmpipe.tokenizer", "llmpipe.chat_template",
     "llmpipe.generate", "llmpipe.lora", "llmpipe.chat_tokens"},
    {"llmpipe.data"},
    {"llmpipe.eval"},
    {"llmpipe.train"},
    {"llmpipe.export", "llmpipe.report"},
    {"llmpipe.cli"},
]


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def imported_modules(path: Path) -> set[str]:
    """The llmpipe modules a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("llmpipe.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "llmpipe":
            found |= {f"llmpipe.{alias.name}" for alias in node.names if alias.name != "__version__"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmpipe."):
            found.add(node.module)
    return found


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
        "train_tokenizer": {layout.TOKENIZER, layout.TOKENIZER_REPORT},
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
        assert paths(stage, "outs") == {str(p) for p in outs}, stage
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


def test_small_reports_are_in_git_and_the_rest_in_the_dvc_cache():
    """Metrics, timings, details and plot data are `cache: false` (a fresh clone has them: `dvc metrics diff`
    compares against HEAD without anyone's DVC cache) and not git-ignored; every other output is cached, and
    git-ignored (by /.gitignore, so DVC writes no .gitignore of its own in reports/)."""
    import subprocess

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text("utf-8"))["stages"]
    in_git = {str(layout.TOKENIZER_METRICS), str(layout.SIZES_JSON), str(layout.VARIANTS_TABLE),
              str(layout.EVALUATE_METRICS)} | {str(directory / name) for directory, names in (
                  (layout.PRETRAIN_REPORTS, (layout.TRAIN_CURVE, layout.EVAL_CURVE, layout.METRICS, layout.DETAILS,
                                             layout.TIMINGS)),
                  (layout.FINETUNE_REPORTS, (layout.TRAIN_CURVE, layout.EVAL_CURVE, layout.METRICS, layout.DETAILS)))
                  for name in names}
    uncached, cached = set(), set()
    for stage in stages.values():
        for entry in (stage.get("outs") or []) + (stage.get("metrics") or []):
            path, options = (next(iter(entry.items())) if isinstance(entry, dict) else (entry, {}))
            (uncached if options.get("cache", True) is False else cached).add(path)
    assert uncached == in_git
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, capture_output=True, text=True,
                             input="\n".join(sorted(uncached | cached))).stdout.split()
    assert set(ignored) == cached
