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

from llmpipe.data.prepared import user_bundle, world_bundle, write_prepared
from llmpipe.data.sources import (
    TXT_SAMPLE_BY,
    clean_documents,
    read_hub_documents,
    read_local_documents,
)
from llmpipe.data.world import ATTRIBUTES, WorldConfig, build_world, max_people
from llmpipe.pipeline import layout
from llmpipe.pipeline.errors import ParamError
from llmpipe.pipeline.params import StageParams
from llmpipe.pipeline.stage import stage
from llmpipe.pipeline.tracking import StageRun

SOURCES = ["embedded", "local_files", "hf_dataset"]


def world_config(params: StageParams) -> WorldConfig:
    return WorldConfig(
        num_people=params.int("data.world.num_people", min=3, max=max_people()),
        attributes=tuple(params.str_list("data.world.attributes", choices=ATTRIBUTES)),
        paraphrases=params.int("data.world.paraphrases", min=1),
        validation_biography_fraction=params.float("data.world.validation_biography_fraction", above=0, max=1),
        finetune_fraction=params.float("data.world.finetune_fraction", above=0, max=1),
        validation_fraction=params.float("data.world.validation_fraction", above=0, max=1),
        mixed_training=params.bool("data.world.mixed_training"),
        mixed_training_copies=params.int("data.world.mixed_training_copies", min=1),
        seed=params.seed(),
    )


def user_documents(params: StageParams, source: str) -> Iterator[str]:
    text_column = params.str("data.text_column")
    if source == "local_files":
        documents = read_local_documents(params.str_list("data.paths"), text_column,
                                         params.str("data.txt_sample_by", choices=list(TXT_SAMPLE_BY)))
        return clean_documents(documents, "data.paths")
    max_documents = params.get("data.max_documents")
    if max_documents is not None:
        max_documents = params.int("data.max_documents", min=1)
    data_files = params.get("data.data_files", None)
    documents = read_hub_documents(
        params.str("data.name"), params.str("data.config", optional=True), params.str("data.split"),
        text_column, params.bool("data.streaming"), max_documents,
        revision=params.str("data.revision", optional=True),
        data_files=params.str_list("data.data_files") if data_files is not None else None)
    return clean_documents(documents, f"data.name={params.str('data.name')}")


@stage("prepare")
def prepare(params: StageParams, run: StageRun) -> None:
    source = params.str("data.source", choices=SOURCES)
    if source == "embedded":
        config = world_config(params)
        if config.finetune_fraction + config.validation_fraction >= 1:
            raise ParamError("params.yaml: data.world.finetune_fraction + data.world.validation_fraction "
                             "must be below 1, so that some people are held out")
        bundle = world_bundle(build_world(config))
    else:
        bundle = user_bundle(
            user_documents(params, source),
            validation_fraction=params.float("data.validation_fraction", above=0, max=0.5),
            seed=params.seed(),
            finetune_train=params.str("data.finetune_train", optional=True),
            finetune_validation=params.str("data.finetune_validation", optional=True),
            finetune_validation_fraction=params.float("data.finetune_validation_fraction", above=0, max=0.5),
        )
    summary = write_prepared(bundle)
    run.log_metrics(summary)
    run.log_artifact(layout.PREPARED_SUMMARY)
    print(f"prepare: wrote {layout.PREPARED}: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.items())))


if __name__ == "__main__":
    prepare()
