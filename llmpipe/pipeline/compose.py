"""Compose conf/ (Hydra) into params.yaml, as DVC's Hydra integration does on `dvc exp run`.

`dvc exp run -S key=value` composes by itself; `llmpipe compose [overrides]` is for a user who edits
conf/ and wants plain `dvc repro` to see it, and for the test that params.yaml equals conf/.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llmpipe.pipeline import atomic
from llmpipe.pipeline.errors import ParamError


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
    except (HydraException, OmegaConfBaseException) as exc:
        message = " ".join(str(exc).split()).split(" Config search path")[0]
        raise ParamError(f"{config_dir}: {message}") from None
    return OmegaConf.to_container(config, resolve=True)


def write_params(params: dict, path: str | Path = "params.yaml") -> None:
    atomic.write_text(path, yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
