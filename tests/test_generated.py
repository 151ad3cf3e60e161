"""What is generated stays generated: conf/, params.yaml, dvc.yaml and docs/params.md are what `llmpipe compose`
writes from the settings dataclasses, the stage table and the stages' imports; changing a default, or adding an
import, is one hand edit plus that one command."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import ROOT

from llmpipe.generate.derived import stale_files

COPIED = ("llmpipe", "stages", "conf", "docs", "dvc.yaml", "params.yaml")


def test_generated_files_are_what_llmpipe_compose_writes():
    stale = stale_files(ROOT)
    assert not stale, f"{', '.join(map(str, stale))} stale: run `llmpipe compose` and commit the result"


@pytest.fixture
def source_copy(tmp_path: Path) -> Path:
    """The repository's hand-written sources and generated files, in a scratch directory."""
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / name)
    return tmp_path


def compose(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """`llmpipe compose` run on the copy's own code (python -m puts the copy first on the path)."""
    return subprocess.run([sys.executable, "-m", "llmpipe.cli", "compose", *args], cwd=repo, capture_output=True,
                          text=True, timeout=300)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text("utf-8")
    assert text.count(old) == 1, f"{path}: {old!r} is not there once"
    path.write_text(text.replace(old, new), "utf-8")


def test_changing_a_default_is_one_edit_and_one_command(source_copy: Path):
    edit(source_copy / "llmpipe/train/settings.py", 'learning_rate: float = setting(3e-3, "peak learning rate',
         'learning_rate: float = setting(2e-3, "peak learning rate')
    check = compose(source_copy, "--check")
    assert check.returncode == 1 and "\n" not in check.stderr.strip(), check.stderr
    for stale in ("conf/config.yaml", "params.yaml", "docs/params.md"):
        assert stale in check.stderr
    assert "llmpipe compose" in check.stderr and "dvc.yaml" not in check.stderr

    assert compose(source_copy).returncode == 0
    assert yaml.safe_load((source_copy / "params.yaml").read_text())["pretrain"]["learning_rate"] == 0.002
    conf = yaml.safe_load((source_copy / "conf/config.yaml").read_text())
    assert conf["pretrain"]["learning_rate"] == 0.002
    assert "| `pretrain.learning_rate` | `0.002` | peak learning rate" in (source_copy / "docs/params.md").read_text()
    assert compose(source_copy, "--check").returncode == 0


def test_a_new_import_becomes_a_dependency_of_the_stage(source_copy: Path):
    """dvc.yaml's code deps are each stage's import closure, but the modules that declare themselves plumbing."""
    edit(source_copy / "stages/tokenize_text.py", "\nfrom llmpipe.config import layout\n",
         "\nfrom llmpipe.config import layout\nfrom llmpipe.eval import qa  # noqa: F401\n")
    check = compose(source_copy, "--check")
    assert check.returncode == 1 and "dvc.yaml" in check.stderr
    assert compose(source_copy).returncode == 0
    deps = yaml.safe_load((source_copy / "dvc.yaml").read_text())["stages"]["tokenize"]["deps"]
    assert "llmpipe/eval/qa.py" in deps and "llmpipe/model/generation.py" in deps  # qa.py's own imports follow
    assert "llmpipe/runner/stage.py" not in deps  # plumbing: NOT_A_STAGE_DEPENDENCY


def test_a_preset_keeps_its_values_and_gets_its_comments(source_copy: Path):
    preset = source_copy / "conf/model/mine.yaml"
    tiny = yaml.safe_load((source_copy / "conf/model/tiny.yaml").read_text())
    preset.write_text("# My own size.\n" + yaml.safe_dump({**tiny, "n_layer": 3}, sort_keys=True))
    assert compose(source_copy).returncode == 0
    text = preset.read_text()
    assert text.startswith("# My own size.\n") and "n_layer: 3" in text and "# transformer blocks" in text
    assert "| mine |" in (source_copy / "conf/config.yaml").read_text()  # the defaults list names the new option

    preset.write_text(text + "n_layers: 4\n")
    refused = compose(source_copy)
    assert refused.returncode == 1
    assert "conf/model/mine.yaml: n_layers: unknown key" in refused.stderr, refused.stderr
