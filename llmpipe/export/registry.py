"""The fine-tuned model in MLflow's Model Registry: logged as a pyfunc model defined from code
(llmpipe/export/serving.py, so nothing is pickled) with its safetensors weights and tokenizer as
artifacts, and registered under a name. Its pip requirements are the versions installed here, which
pyproject.toml pins."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from llmpipe.pipeline.tracking import StageRun

SERVING_PACKAGES = ("mlflow", "torch", "tokenizers", "safetensors", "numpy")


def pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def register_chat_model(run: StageRun, model_dir: str | Path, tokenizer_dir: str | Path,
                        registered_name: str) -> str | None:
    """Log the model into the stage's run and register it; returns the registered version."""
    if not run.enabled:
        return None
    import mlflow

    import llmpipe
    from llmpipe.export import serving

    package_dir = Path(llmpipe.__file__).parent
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="chat_model", python_model=serving.__file__, code_paths=[str(package_dir)],
            artifacts={"model": str(model_dir), "tokenizer": str(tokenizer_dir)},
            pip_requirements=pip_requirements(), registered_model_name=registered_name,
        )
    return str(info.registered_model_version) if info.registered_model_version else None
