"""Start-up: the libraries that take a second or more to import load only where they are used. `llmpipe --help`,
`compose` and `sweep` start without torch or MLflow; a stage process loads MLflow only when it logs (rank 0), and the
multi-process launcher loads neither Hydra nor the stage's libraries."""

import json
import subprocess
import sys

from harness import ROOT

SLOW_TO_IMPORT = ["torch", "mlflow", "hydra", "dvc", "transformers", "datasets", "matplotlib", "pyarrow"]


def loaded_after(statement: str) -> set[str]:
    """The slow-to-import libraries a fresh interpreter holds after running `statement`."""
    code = (f"import sys; {statement}; import json; "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({SLOW_TO_IMPORT!r}))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_command_line_starts_without_torch_or_mlflow():
    assert loaded_after("import llmpipe.cli") == set()


def test_a_stage_that_logs_nothing_loads_no_mlflow_dvc_or_transformers():
    """What every stage's entry point and a rank other than 0 import: Hydra (the stage composes params.yaml at
    once), no torch (the stages that encode text never need it), MLflow, DVC, transformers or datasets."""
    assert loaded_after("import llmpipe.runner.stage, llmpipe.tracking.stage_run") == {"hydra"}


def test_the_stages_that_encode_text_start_without_torch():
    """prepare, train_tokenizer and tokenize: about 1.5 s sooner per run on a 2-core machine."""
    for script in ("prepare", "train_tokenizer", "tokenize_text"):
        assert "torch" not in loaded_after(f"import runpy; runpy.run_path('stages/{script}.py')"), script


def test_the_launcher_starts_without_torch():
    """One process (the default) runs the stage in the launcher's process: the stage's imports are its own."""
    assert loaded_after("import llmpipe.runner.launch") == set()
