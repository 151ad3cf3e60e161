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

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from llmpipe.model.weights import WEIGHTS_FILE
from llmpipe.pipeline.errors import InputDataError
from llmpipe.pipeline.layout import repository_root
from llmpipe.pipeline.provenance import file_md5, git_commit, input_hashes
from llmpipe.pipeline.tracking import StageRun
from llmpipe.serve.alias import record_and_elect

SERVING_PACKAGES = ("mlflow", "torch", "tokenizers", "safetensors", "numpy")
WEIGHTS_POINTER = "weights.json"  # in the MLflow model's "model" artifact, instead of the weights (dvc_cache)
CACHE_ENVIRONMENT = "LLMPIPE_DVC_CACHE"


def pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def content_md5(model_dir: str | Path, tokenizer_dir: str | Path) -> str:
    hashes = input_hashes([str(model_dir), str(tokenizer_dir)])
    return "-".join(hashes[str(p)][:16] for p in (model_dir, tokenizer_dir))


def dvc_cache_object(path: Path, md5: str) -> Path | None:
    """The file in this repository's DVC cache that holds `path`'s content (md5 `md5`), or None."""
    try:
        from dvc.repo import Repo

        with Repo(str(repository_root())) as repo:
            cached = Path(repo.cache.local.oid_to_path(md5))
    except Exception:  # not a DVC repository, or no local cache
        return None
    return cached if cached.is_file() and cached.stat().st_size == path.stat().st_size else None


def model_artifact(model_dir: Path, storage: str, scratch: Path) -> tuple[Path, str]:
    """The directory to log as the MLflow model's "model" artifact, and how its weights are stored: the model
    directory itself (copy), or, when DVC's cache holds the weights, its small files with a pointer to them."""
    weights = model_dir / WEIGHTS_FILE
    if storage == "copy":
        return model_dir, "copy"
    md5 = file_md5(weights)
    cached = dvc_cache_object(weights, md5)
    if cached is None:
        print(f"evaluate: {weights} is not in DVC's cache: the registered model holds a copy", flush=True)
        return model_dir, "copy"
    artifact = scratch / model_dir.name  # MLflow keeps the directory's name
    artifact.mkdir()
    for file in model_dir.iterdir():
        if file.is_file() and file.name != WEIGHTS_FILE:
            shutil.copy2(file, artifact / file.name)
    pointer = {"file": WEIGHTS_FILE, "md5": md5, "bytes": weights.stat().st_size, "dvc_cache_object": str(cached)}
    (artifact / WEIGHTS_POINTER).write_text(json.dumps(pointer, indent=1) + "\n", encoding="utf-8")
    return artifact, "dvc_cache"


def referenced_weights(model_dir: str | Path) -> Path:
    """The weights file of a registered model's "model" artifact: its own, or the one its weights.json names
    (in the DVC cache it was logged from, or under $LLMPIPE_DVC_CACHE), checked by size."""
    model_dir = Path(model_dir)
    pointer_path = model_dir / WEIGHTS_POINTER
    if not pointer_path.is_file():
        return model_dir / WEIGHTS_FILE
    pointer = json.loads(pointer_path.read_text("utf-8"))
    md5 = pointer["md5"]
    candidates = [Path(pointer["dvc_cache_object"])]
    if os.environ.get(CACHE_ENVIRONMENT):
        candidates.append(Path(os.environ[CACHE_ENVIRONMENT]) / "files" / "md5" / md5[:2] / md5[2:])
    for candidate in candidates:
        if candidate.is_file() and candidate.stat().st_size == pointer["bytes"]:
            return candidate
    raise InputDataError(f"the registered model's weights (md5 {md5}) are in no DVC cache at "
                         f"{', '.join(map(str, candidates))}: run `dvc pull` for them in the repository, or set "
                         f"{CACHE_ENVIRONMENT} to a .dvc/cache that has them")


def register_chat_model(run: StageRun, model_dir: str | Path, tokenizer_dir: str | Path, registered_name: str,
                        metrics: dict[str, float] | None = None, weights: str = "copy") -> tuple[str | None, bool]:
    """Log the model into the stage's run and register it, unless a version with the same weights and
    tokenizer exists; returns (version, whether it is new). `weights`: copy | dvc_cache (module docstring)."""
    if not run.enabled:
        return None, False
    import mlflow
    from mlflow.tracking import MlflowClient

    import llmpipe
    from llmpipe.serve import chat_model

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
