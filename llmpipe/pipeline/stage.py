"""Turn a stage function into a Hydra app over params.yaml that DVC can run.

    @stage("tokenize")
    def tokenize(params: StageParams, run: StageRun) -> None: ...

    if __name__ == "__main__":
        tokenize()

What the wrapper does:
- Hydra composes params.yaml (the repository root's, config_name "params", version_base set) into
  the config. Hydra's own outputs are switched off: no outputs/ folder, no change of directory,
  no log files. Command-line overrides (`key=value`) work as in any Hydra app.
- The stage sees only the keys its dvc.yaml entry declares (see llmpipe.pipeline.params), and a key
  under them that conf/ does not know (a typo) is refused, naming the closest known key.
- It opens the stage's MLflow run (see llmpipe.pipeline.tracking) with those params, tagged with the md5 of
  each dependency dvc.yaml lists for the stage.
- A `PipelineError` (bad input or params) becomes one line on stderr, `error: ...`, and exit status 1.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

from llmpipe.pipeline.distributed import ProcessInfo
from llmpipe.pipeline.errors import PipelineError
from llmpipe.pipeline.params import (
    CONF_DIR,
    StageParams,
    declared_dependencies,
    schema_keys,
)
from llmpipe.pipeline.provenance import input_hashes
from llmpipe.pipeline.tracking import StageRun

HYDRA_QUIET_OVERRIDES = [
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
]

StageFunction = Callable[[StageParams, StageRun], None]


def run_stage(name: str, config: dict, body: StageFunction) -> None:
    """Run `body` with the stage's declared params and its MLflow run; map user errors to exit 1."""
    try:
        params = StageParams.for_stage(name, config)
        if os.path.isdir(CONF_DIR):
            params.check_known_keys(schema_keys())
        hashes = input_hashes(declared_dependencies(name))
        with StageRun(name, params.declared_values(), hashes, enabled=ProcessInfo.from_environment().is_main) as run:
            body(params, run)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


def stage(name: str) -> Callable[[StageFunction], Callable[[], None]]:
    """Decorator: make `body(params, run)` the Hydra entry point of DVC stage `name`."""

    def decorate(body: StageFunction) -> Callable[[], None]:
        import hydra
        from omegaconf import DictConfig, OmegaConf

        # The stage runs from the repository root (DVC's wdir), where params.yaml lives.
        @hydra.main(config_path=os.getcwd(), config_name="params", version_base="1.3")
        def hydra_app(config: DictConfig) -> None:
            run_stage(name, OmegaConf.to_container(config, resolve=True), body)

        @functools.wraps(body)
        def main() -> None:
            logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
            if not os.path.exists("params.yaml"):
                print("error: params.yaml not found in the current directory; run stages from the "
                      "repository root", file=sys.stderr)
                sys.exit(1)
            sys.argv[1:1] = HYDRA_QUIET_OVERRIDES
            hydra_app()

        return main

    return decorate
