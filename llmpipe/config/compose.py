"""Compose conf/ (Hydra) into params.yaml, as DVC's Hydra integration does on `dvc exp run`.

`dvc exp run -S key=value` composes by itself; `llmpipe compose [overrides]` is for a user who edits
conf/ and wants plain `dvc repro` to see it, and for the test that params.yaml equals conf/.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from llmpipe import atomic
from llmpipe.errors import ParamError

NOT_A_STAGE_DEPENDENCY = "restore's params.yaml, as conf/ composes it"  # see llmpipe.generate.code_deps


def compose(overrides: list[str] | None = None, config_dir: str | Path = "conf") -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir).resolve()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            config = hydra_compose(config_name="config", overrides=list(overrides or []))
    except yaml.MarkedYAMLError as exc:
        raise ParamError(yaml_error(exc, str(config_dir))) from None
    except (HydraException, OmegaConfBaseException) as exc:
        message = " ".join(str(exc).split()).split(" Config search path")[0]
        raise ParamError(f"{config_dir}: {message}") from None
    return OmegaConf.to_container(config, resolve=True)


def yaml_error(exc: yaml.MarkedYAMLError, fallback: str) -> str:
    """A YAML syntax error (a duplicate key included) as `FILE:LINE:COLUMN: not valid YAML (problem)`."""
    mark = exc.problem_mark or exc.context_mark
    name = mark.name if mark and mark.name and not mark.name.startswith("<") else fallback
    where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    name = os.path.relpath(name) if os.path.isabs(name) else name
    return f"{name}{where}: not valid YAML ({exc.problem or exc.context})"


def write_params(params: dict, path: str | Path = "params.yaml") -> None:
    atomic.write_text(path, yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
