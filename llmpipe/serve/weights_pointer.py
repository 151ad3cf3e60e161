"""Where a registered model's weights are: in its own "model" artifact (`evaluate.registry_weights: copy`), or
named there by md5 in `weights.json` and kept in DVC's cache (`dvc_cache`: the weights stored once, by DVC).
Logging writes the pointer (model_artifact); loading follows it (referenced_weights)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llmpipe.config.layout import repository_root
from llmpipe.errors import InputDataError
from llmpipe.model.weights import WEIGHTS_FILE
from llmpipe.tracking.provenance import file_md5

WEIGHTS_POINTER = "weights.json"  # in the MLflow model's "model" artifact, instead of the weights (dvc_cache)
CACHE_ENVIRONMENT = "LLMPIPE_DVC_CACHE"


def dvc_cache_object(path: Path, md5: str) -> Path | None:
    """The file in this repository's DVC cache that holds `path`'s content (md5 `md5`), or None."""
    try:
        # deferred and optional: the registered model's environment (registry.SERVING_PACKAGES) has no dvc
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
