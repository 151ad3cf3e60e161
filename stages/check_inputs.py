"""Stage `check_inputs`: check the paths a user supplies and write their fingerprints, which the later stages depend
on instead of the paths themselves (DVC runs it first, every time: `always_changed`; no MLflow run).

- user_data/ (what `prepare` reads with data=local_files) → data/inputs/user_data.json;
- with base_model.source=hf, the checkpoint base_model.path names (train_tokenizer and pretrain import it)
  → data/inputs/base_model.json (with source=scratch, the path is not read and may not exist).

The other dependencies in dvc.yaml that no stage writes (the stages' code) must exist and open as well.
A missing path, an unreadable file or directory, or anything that is not a directory or a regular file (a FIFO,
a socket, a device, a dangling symbolic link) is refused in one line naming it, before DVC hashes or deletes
anything of a later stage; see llmpipe.data.inputs. Run: `dvc repro check_inputs`.
"""

from pathlib import Path

import yaml

from llmpipe.atomic import write_json
from llmpipe.config import layout
from llmpipe.config.params import StageParams
from llmpipe.data.inputs import check_readable, fingerprint, source_dependencies
from llmpipe.hf.base_model import BaseModelSettings, base_model_settings
from llmpipe.runner.stage import stage
from llmpipe.tracking.stage_run import StageRun


@stage("check_inputs", base_model_settings, tracked=False)
def check_inputs(base_model: BaseModelSettings, params: StageParams, run: StageRun) -> None:
    stages = yaml.safe_load(Path("dvc.yaml").read_text("utf-8"))["stages"]
    for stage_name, dependencies in source_dependencies(stages).items():
        for dependency in dependencies:
            check_readable(dependency, f"dvc.yaml: stages.{stage_name}.deps")
    user_data = fingerprint(layout.USER_DATA, cache_path=layout.INPUT_HASHES)
    checkpoint = ({"source": "hf", **fingerprint(base_model.path, "params.yaml: base_model.path",
                                                 cache_path=layout.INPUT_HASHES)}
                  if base_model.source == "hf" else {"source": base_model.source})
    layout.INPUTS.mkdir(parents=True, exist_ok=True)
    write_json(layout.USER_DATA_FINGERPRINT, user_data)
    write_json(layout.BASE_MODEL_FINGERPRINT, checkpoint)


if __name__ == "__main__":
    check_inputs()
