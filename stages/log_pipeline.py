"""Stage `log_pipeline`: complete the MLflow pipeline run of this execution (`dvc repro`, `dvc exp run`) from the
outputs it ends with, whether their stages ran or DVC restored them (unchanged, or from the run-cache: `dvc repro
--pull`, a pushed experiment "cached - skipping run"): every param of params.yaml (a null one as the stage that
reads it resolved it), every stage's DVC metrics, which stages ran; creating the run when no stage ran. So every
execution of the whole pipeline is one pipeline run in MLflow, compared like for like with any other
(llmpipe.tracking.pipeline_run).

DVC runs it last, every time (`always_changed`; its deps are every stage's metrics and effective params), and
it writes nothing DVC tracks. Run by hand (no DVC execution to log) it says so and does nothing.
"""

import sys

from llmpipe.config.params import StageParams
from llmpipe.runner.stage import stage
from llmpipe.tracking import store
from llmpipe.tracking.pipeline_run import record_execution
from llmpipe.tracking.provenance import pipeline_execution_key
from llmpipe.tracking.stage_run import StageRun


def no_settings(params: StageParams) -> None:
    return None


@stage("log_pipeline", no_settings, tracked=False)
def log_pipeline(settings: None, params: StageParams, run: StageRun) -> None:
    key = pipeline_execution_key()
    if key is None:
        print("log_pipeline: not run by DVC (`dvc repro`, `dvc exp run`): no pipeline execution to log",
              file=sys.stderr, flush=True)
        return
    client, experiment_id = store.connect()
    run_id = record_execution(client, experiment_id, key, params.declared_values())
    print(f"log_pipeline: MLflow pipeline run {run_id} ({store.tracking_uri()})", flush=True)


if __name__ == "__main__":
    log_pipeline()
