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
     "llmpipe.generate", "llmpipe.lora"},
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
                     layout.PRETRAIN_REPORTS / layout.EVAL_CURVE},
        "finetune": {layout.FINETUNED, layout.FINETUNE_REPORTS / layout.TRAIN_CURVE,
                     layout.FINETUNE_REPORTS / layout.EVAL_CURVE, layout.FINETUNE_REPORTS / layout.SAMPLES},
        "quantize": {layout.GGUF, layout.HF_EXPORT, layout.SIZES_TABLE},
        "evaluate": {layout.REPORT, layout.FIGURES, layout.VARIANTS_TABLE},
    }
    expected_metrics = {"train_tokenizer": layout.TOKENIZER_METRICS, "pretrain": layout.PRETRAIN_REPORTS / layout.METRICS,
                        "finetune": layout.FINETUNE_REPORTS / layout.METRICS, "quantize": layout.SIZES_METRICS,
                        "evaluate": layout.EVALUATE_METRICS}
    for stage, outs in expected_outs.items():
        assert paths(stage, "outs") == {str(p) for p in outs}, stage
    for stage, metrics in expected_metrics.items():
        assert paths(stage, "metrics") == {str(metrics)}, stage
    prepared_files = {str(p) for p in [*layout.PRETRAIN_TEXT.values(), *layout.FINETUNE_EXAMPLES.values(),
                                      *layout.QA_FILES.values()]}
    for stage in stages:
        read = {dep for dep in paths(stage, "deps") if dep.startswith(str(layout.PREPARED) + "/")}
        assert read <= prepared_files, (stage, read - prepared_files)
        missing = [dep for dep in paths(stage, "deps") if dep.startswith(("llmpipe/", "stages/"))
                   and not (ROOT / dep).is_file()]
        assert not missing, (stage, missing)
