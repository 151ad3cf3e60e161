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
- When the output is not a terminal (CI, `dvc queue logs`, a log file), the libraries' progress bars
  (datasets, MLflow artifact uploads) are switched off; the training loop prints plain lines instead.
- A `PipelineError` (bad input or params) becomes one line on stderr, `error: ...`, and exit status 1;
  outputs DVC deleted before the run are put back from its cache, and under `dvc exp run` params.yaml
  as conf/ composes it (llmpipe.pipeline.restore); a successful run files its `cache: false` outputs
  in that cache, so they can be put back too.
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
    flat_values,
    schema_keys,
)
from llmpipe.pipeline.provenance import input_hashes
from llmpipe.pipeline.restore import restore_outputs, restore_params_file, stash_uncached_outputs
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
    is_main = ProcessInfo.from_environment().is_main
    try:
        params = StageParams.for_stage(name, config)
        if os.path.isdir(CONF_DIR):
            params.check_known_keys(schema_keys())
        hashes = input_hashes(declared_dependencies(name))
        with StageRun(name, params.declared_values(), hashes, enabled=is_main,
                      pipeline_params=flat_values(config)) as run:
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


def check_params_file() -> None:
    """params.yaml exists and is YAML, so a syntax error is one line with its position, not Hydra's traceback."""
    import yaml

    if not os.path.exists(PARAMS_FILE):
        fail(f"{PARAMS_FILE} not found in the current directory; run stages from the repository root")
    try:
        with open(PARAMS_FILE, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        fail(f"{PARAMS_FILE}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})")
    if not isinstance(content, dict):
        fail(f"{PARAMS_FILE}: expected a mapping of sections (data, model, pretrain, ...)")


def stage(name: str) -> Callable[[StageFunction], Callable[[], None]]:
    """Decorator: make `body(params, run)` the Hydra entry point of DVC stage `name`."""

    def decorate(body: StageFunction) -> Callable[[], None]:
        import hydra
        from omegaconf import DictConfig, OmegaConf

        # The stage runs from the repository root (DVC's wdir), where params.yaml lives.
        @hydra.main(config_path=os.getcwd(), config_name="params", version_base="1.3")
        def hydra_app(config: DictConfig) -> None:
            from omegaconf.errors import OmegaConfBaseException

            try:
                values = OmegaConf.to_container(config, resolve=True)
            except OmegaConfBaseException as exc:  # e.g. an ${interpolation} that points nowhere
                fail(f"{PARAMS_FILE}: {' '.join(str(exc).split())}".split(" full_key:")[0])
            run_stage(name, values, body)

        @functools.wraps(body)
        def main() -> None:
            logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
            if not sys.stdout.isatty():
                for variable in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
                    os.environ.setdefault(variable, "1")
                os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            check_params_file()
            sys.argv[1:1] = HYDRA_QUIET_OVERRIDES
            hydra_app()

        return main

    return decorate
