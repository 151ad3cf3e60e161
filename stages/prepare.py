"""Stage `prepare`: build the pretraining text, fine-tuning examples and QA evaluation sets.

Source (params `data`, a Hydra group: `dvc exp run -S data=local_files`):
- embedded (default): a seeded world of fictional people (llmpipe.data.world); no network;
- local_files: text / JSONL / Parquet files by glob (`data.paths`, `data.text_column`);
- hf_dataset: `datasets.load_dataset(data.name, data.config, split=data.split)`; `data.streaming: true`
  for a corpus larger than memory or disk.
A user corpus streams from the source to the JSONL files (memory does not grow with its size); each
document goes to the validation text with probability data.validation_fraction (seeded).
Output: data/prepared/ (see llmpipe.data.prepared). Run: `dvc repro prepare` (or `python stages/prepare.py`).
"""

from typing import Iterator

from llmpipe.config import layout
from llmpipe.config.params import StageParams
from llmpipe.data.prepared import user_bundle, world_bundle, write_prepared
from llmpipe.data.settings import EmbeddedData, HubData, LocalFilesData, data_settings
from llmpipe.data.sources import (
    clean_documents,
    read_hub_documents,
    read_local_documents,
)
from llmpipe.data.world import build_world
from llmpipe.runner.stage import stage
from llmpipe.tracking.stage_run import StageRun


def user_documents(data: LocalFilesData | HubData) -> Iterator[str]:
    if isinstance(data, LocalFilesData):
        key = "data.paths"  # named in the messages about its files
        return clean_documents(read_local_documents(data.paths, key, data.text_column, data.txt_sample_by), key)
    documents = read_hub_documents(data.name, data.config, data.split, data.text_column, data.streaming,
                                   data.max_documents, revision=data.revision, data_files=data.data_files)
    return clean_documents(documents, f"data.name={data.name}")


def read_settings(params: StageParams) -> EmbeddedData | LocalFilesData | HubData:
    return data_settings(params, params.seed())


@stage("prepare", read_settings)
def prepare(data: EmbeddedData | LocalFilesData | HubData, params: StageParams, run: StageRun) -> None:
    seed = params.seed()
    if isinstance(data, EmbeddedData):
        bundle = world_bundle(build_world(data.world))
    else:
        bundle = user_bundle(user_documents(data), validation_fraction=data.validation_fraction, seed=seed,
                             finetune_train=data.finetune_train, finetune_validation=data.finetune_validation,
                             finetune_validation_fraction=data.finetune_validation_fraction)
    summary = write_prepared(bundle)
    run.log_metrics(summary)
    run.log_artifact(layout.PREPARED_SUMMARY)
    print(f"prepare: wrote {layout.PREPARED}: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.items())))


if __name__ == "__main__":
    prepare()
