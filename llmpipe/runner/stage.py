"""Turn a stage function into the entry point DVC runs.

    def tokenize_settings(params: StageParams) -> TokenizeSettings:
        return params.read(TokenizeSettings)

    @stage("tokenize", tokenize_settings)
    def tokenize(settings: TokenizeSettings, params: StageParams, run: StageRun) -> None: ...

    if __name__ == "__main__":
        tokenize()

The entry point composes params.yaml with Hydra (the repository root's; `key=value` arguments override it
as in any Hydra app), hands the stage only the keys its dvc.yaml entry declares (refusing keys conf/ does
not know, naming the closest), reads and checks the stage's settings (its second argument), and then opens the
stage's MLflow run and runs the stage with them. Settings refused by hand (`python stages/<stage>.py`) cost no
MLflow start-up and record no run; under DVC the refusal is a FAILED run of the pipeline's execution, as
any other failure. Before all of it, the entry point removes what killed processes left: temporary paths whose
owner is gone (llmpipe.atomic) and MLflow runs left RUNNING (llmpipe.tracking.orphans). All of it runs under
llmpipe.runner.guard: whatever ends the stage (a refusal, any other exception, SIGTERM, Ctrl-C) is one line on
stderr and a non-zero exit, with the previous outputs put back.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmpipe.atomic import remove_orphaned_temporaries, write_json
from llmpipe.config import layout
from llmpipe.config.compose import yaml_error
from llmpipe.config.layout import repository_root
from llmpipe.config.params import (
    CONF_DIR,
    PARAMS_FILE,
    StageParams,
    declared_dependencies,
    declared_outputs,
    flatten,
    schema_keys,
)
from llmpipe.errors import PipelineError
from llmpipe.runner.ranks import launched_ranks
from llmpipe.runner.guard import guarded
from llmpipe.runner.restore import stash_uncached_outputs
from llmpipe.runner.heartbeat import Heartbeat
from llmpipe.tracking.provenance import input_hashes, pipeline_execution_key
from llmpipe.tracking.stage_run import StageRun

NOT_A_STAGE_DEPENDENCY = "the entry point: reads params.yaml, opens the MLflow run, one-line errors"  # see llmpipe.generate.code_deps

SettingsReader = Callable[[StageParams], Any]
StageFunction = Callable[[Any, StageParams, StageRun], None]


def output_roots(dvc_yaml: str | Path = "dvc.yaml") -> list[Path]:
    """The top directories of every output dvc.yaml declares (data, models, reports), and the checkpoints'."""
    try:
        stages = (yaml.safe_load(Path(dvc_yaml).read_text("utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        stages = {}
    tops = {Path(path).parts[0] for definition in stages.values() for path in declared_outputs(definition or {})}
    return [Path(top) for top in sorted(tops) if Path(top).is_dir()] + [repository_root() / "checkpoints"]


def remove_leftovers(stage: str) -> None:
    """What killed processes left (half-written outputs, checkpoints: `.name.tmp-PID`, `.name.old-PID`, the PID
    gone): deleted, and said."""
    removed = remove_orphaned_temporaries(output_roots())
    if removed:
        print(f"{stage}: removed what {len(removed)} write(s) of processes that are gone left: "
              + ", ".join(os.path.relpath(path) for path in removed[:5]) + (", ..." if len(removed) > 5 else ""),
              file=sys.stderr, flush=True)


def run_stage(name: str, config: dict, read_settings: SettingsReader, body: StageFunction,
              tracked: bool = True) -> None:
    """Read the stage's settings from its declared params, then run `body` with them and its MLflow run (rank 0's;
    the others run without; none for a stage that is not `tracked`)."""
    is_main = launched_ranks().is_main
    if is_main:
        remove_leftovers(name)
    params = StageParams.for_stage(name, config)

    def stage_run() -> StageRun:
        with Heartbeat(f"{name}: hashing its inputs:", None, enabled=is_main):
            hashes = input_hashes(declared_dependencies(name))
        return StageRun(name, params.declared_values(), hashes, enabled=is_main and tracked,
                        pipeline_params=flatten(config))

    # A line at least every 30 s from the process's start, whatever the stage does (hashing a 13 GB input: ~1 min)
    with Heartbeat(f"{name}:", None, enabled=is_main):
        try:
            if os.path.isdir(CONF_DIR):
                params.check_known_keys(schema_keys())
            settings = read_settings(params)
        except PipelineError:
            if is_main and tracked and pipeline_execution_key():  # under DVC: the execution's runs record it
                with stage_run():
                    raise
            raise
        with stage_run() as run:
            body(settings, params, run)
            if is_main and name in layout.EFFECTIVE_PARAMS:  # {} when every param had a value (or none applies)
                write_json(layout.EFFECTIVE_PARAMS[name], dict(sorted(run.defaulted.items())))
    if is_main:
        stash_uncached_outputs(name)


def load_params(overrides: list[str]) -> dict:
    """params.yaml, composed once by Hydra with the command line's overrides and resolved; a syntax error,
    a duplicate key or an interpolation that points nowhere is one line naming the place."""
    if not os.path.exists(PARAMS_FILE):
        raise PipelineError(f"{PARAMS_FILE} not found in the current directory; run stages from the repository root")
    try:
        # The stage runs from the repository root (DVC's wdir), where params.yaml lives.
        with initialize_config_dir(config_dir=os.getcwd(), version_base="1.3"):
            values = OmegaConf.to_container(compose(config_name="params", overrides=overrides), resolve=True)
    except yaml.MarkedYAMLError as exc:
        raise PipelineError(yaml_error(exc, PARAMS_FILE)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise PipelineError(f"{PARAMS_FILE}: {' '.join(str(exc).split())}".split(" full_key:")[0]) from None
    if not isinstance(values, dict):
        raise PipelineError(f"{PARAMS_FILE}: expected a mapping of sections (data, model, pretrain, ...)")
    return values


def stage(name: str, read_settings: SettingsReader,
          tracked: bool = True) -> Callable[[StageFunction], Callable[[], None]]:
    """Decorator: make `body(read_settings(params), params, run)` the entry point of DVC stage `name`;
    `tracked=False` for a stage that DVC runs every time and that opens no MLflow run (check_inputs: its `run` is
    a no-op)."""

    def decorate(body: StageFunction) -> Callable[[], None]:
        @functools.wraps(body)
        def main() -> None:
            logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
            if not sys.stdout.isatty():
                for variable in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
                    os.environ.setdefault(variable, "1")
                os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            with guarded(name, launched_ranks().rank):
                run_stage(name, load_params(sys.argv[1:]), read_settings, body, tracked)

        return main

    return decorate
