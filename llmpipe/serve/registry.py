"""The fine-tuned model in MLflow's Model Registry: logged as a chat model defined from code
(llmpipe/serve/chat_model.py, so nothing is pickled) with its safetensors weights and tokenizer as
artifacts, and registered under a name. Its signature is MLflow's chat-completions request and response
(fixed by mlflow.pyfunc.ChatModel); MLflow runs the model once on chat_model.INPUT_EXAMPLE, which is saved
with it. Its pip requirements are the versions installed here, which pyproject.toml pins.

A new version is registered only when the weights or the tokenizer changed (their md5 is the version's
`weights_md5` tag): rerunning evaluate for a report setting adds none. Each version carries the commit, the
DVC experiment and the headline metrics as tags, and a description; the alias `champion` follows the rule in
llmpipe.serve.alias.

Where the weights are stored (`evaluate.registry_weights`):
- `copy`: in the MLflow model, which then stands alone (MLflow copies them into its artifact store: a
  second copy of the weights beside DVC's cache);
- `dvc_cache`: not in the MLflow model, which holds `weights.json` instead, naming them by md5 and size and
  where DVC's cache holds them (`.dvc/cache/files/md5/..`): the weights are stored once, by DVC. Loading
  looks there, then in `$LLMPIPE_DVC_CACHE/files/md5/..` (another clone's cache, filled by `dvc pull`). Weights
  that are not in DVC's cache (a stage run by hand, `--no-commit`) are copied.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import llmpipe
from llmpipe.serve import chat_model
from llmpipe.serve.alias import record_and_elect
from llmpipe.serve.weights_pointer import model_artifact
from llmpipe.tracking.provenance import git_commit, input_hashes
from llmpipe.tracking.stage_run import StageRun

SERVING_PACKAGES = ("mlflow", "torch", "tokenizers", "safetensors", "numpy")


def pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def content_md5(model_dir: str | Path, tokenizer_dir: str | Path) -> str:
    hashes = input_hashes([str(model_dir), str(tokenizer_dir)])
    return "-".join(hashes[str(p)][:16] for p in (model_dir, tokenizer_dir))


def register_chat_model(run: StageRun, model_dir: str | Path, tokenizer_dir: str | Path, registered_name: str,
                        metrics: dict[str, float] | None = None, weights: str = "copy") -> tuple[str | None, bool]:
    """Log the model into the stage's run and register it, unless a version with the same weights and
    tokenizer exists; returns (version, whether it is new). `weights`: copy | dvc_cache (module docstring). Nothing
    when the tracking server went away during the stage (`run.lost`)."""
    if not run.enabled or run.lost:
        return None, False
    client = MlflowClient()
    digest = content_md5(model_dir, tokenizer_dir)
    if client.search_registered_models(filter_string=f"name = '{registered_name}'"):
        same = client.search_model_versions(f"name = '{registered_name}' and tags.weights_md5 = '{digest}'")
        if same:
            version = str(max(int(v.version) for v in same))
            record_and_elect(client, registered_name, version)
            return version, False
    package_dir = Path(llmpipe.__file__).parent
    with tempfile.TemporaryDirectory() as scratch, mlflow.start_run(run_id=run.run_id):
        artifact, storage = model_artifact(Path(model_dir), weights, Path(scratch))
        info = mlflow.pyfunc.log_model(
            name="chat_model", python_model=chat_model.__file__, code_paths=[str(package_dir)],
            artifacts={"model": str(artifact), "tokenizer": str(tokenizer_dir)},
            input_example=chat_model.INPUT_EXAMPLE, pip_requirements=pip_requirements(),
            model_config={"model_name": registered_name},  # the `model` of its answers
            registered_model_name=registered_name,
        )
    version = str(info.registered_model_version)
    tags = {"weights_md5": digest, "weights_storage": storage, "git_commit": git_commit() or "", "dvc.stage": run.stage,
            "dvc.experiment": os.environ.get("DVC_EXP_NAME", ""),
            **{f"metric.{k}": f"{v:.4g}" for k, v in (metrics or {}).items()}}
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    client.update_model_version(registered_name, version, description=(
        f"Fine-tuned chat model from {model_dir} (tokenizer {tokenizer_dir}), registered by the evaluate stage; "
        f"weights md5 {digest}."))
    record_and_elect(client, registered_name, version)
    return version, True
