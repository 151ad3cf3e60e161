"""Turn a stage function into the entry point DVC runs.

    @stage("tokenize")
    def tokenize(params: StageParams, run: StageRun) -> None: ...

    if __name__ == "__main__":
        tokenize()

The entry point composes params.yaml with Hydra (the repository root's; `key=value` arguments override it
as in any Hydra app), hands the stage only the keys its dvc.yaml entry declares (refusing keys conf/ does
not know, naming the closest), and opens the stage's MLflow run. A `PipelineError` becomes one line on
stderr and exit status 1, with the previous outputs put back (llmpipe.pipeline.restore).
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
    PARAMS_FILE,
    StageParams,
    declared_dependencies,
    flatten,
    schema_keys,
)
from llmpipe.pipeline.provenance import input_hashes
from llmpipe.pipeline.restore import (
    restore_outputs,
    restore_params_file,
    stash_uncached_outputs,
)
from llmpipe.pipeline.tracking import StageRun

StageFunction = Callable[[StageParams, StageRun], None]


def run_stage(name: str, config: dict, body: StageFunction) -> None:
    """Run `body` with the stage's declared params and its MLflow run; map user errors to exit 1."""
    is_main = ProcessInfo.from_environment().is_main
    try:
        params = StageParams.for_stage(name, config)
        if os.path.isdir(CONF_DIR):
            params.check_known_keys(schema_keys())
        hashes = input_hashes(declared_dependencies(name))
        with StageRun(name, params.declared_values(), hashes, enabled=is_main,
                      pipeline_params=flatten(config)) as run:
            body(params, run)
        if is_main:
            stash_uncached_outputs(name)
    except PipelineError as error:
        restored = restore_outputs(name) if is_main else []
        if restored:
            print(f"{name}: kept the previous outputs ({', '.join(restored)})", file=sys.stderr, flush=True)
        if is_main and os.environ.get("DVC_EXP_BASELINE_REV") and restore_params_file():
            print(f"{name}: put back {PARAMS_FILE} as conf/ composes it (the refused experiment's values are not kept)",
                  file=sys.stderr, flush=True)
        fail(str(error))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def load_params(overrides: list[str]) -> dict:
    """params.yaml, composed once by Hydra with the command line's overrides and resolved; a syntax error,
    a duplicate key or an interpolation that points nowhere is one line naming the place."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not os.path.exists(PARAMS_FILE):
        fail(f"{PARAMS_FILE} not found in the current directory; run stages from the repository root")
    try:
        # The stage runs from the repository root (DVC's wdir), where params.yaml lives.
        with initialize_config_dir(config_dir=os.getcwd(), version_base="1.3"):
            values = OmegaConf.to_container(compose(config_name="params", overrides=overrides), resolve=True)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        fail(f"{PARAMS_FILE}{where}: not valid YAML ({exc.problem or exc.context})")
    except (HydraException, OmegaConfBaseException) as exc:
        fail(f"{PARAMS_FILE}: {' '.join(str(exc).split())}".split(" full_key:")[0])
    if not isinstance(values, dict):
        fail(f"{PARAMS_FILE}: expected a mapping of sections (data, model, pretrain, ...)")
    return values


def stage(name: str) -> Callable[[StageFunction], Callable[[], None]]:
    """Decorator: make `body(params, run)` the entry point of DVC stage `name`."""

    def decorate(body: StageFunction) -> Callable[[], None]:
        @functools.wraps(body)
        def main() -> None:
            logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
            if not sys.stdout.isatty():
                for variable in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
                    os.environ.setdefault(variable, "1")
                os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            run_stage(name, load_params(sys.argv[1:]), body)

        return main

    return decorate
