"""The `data` section: where the text comes from (the Hydra group conf/data/: embedded | local_files |
hf_dataset), one settings dataclass per source."""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmpipe.config.params import StageParams, params_section, setting
from llmpipe.data.sources import TXT_SAMPLE_BY
from llmpipe.data.world import WorldConfig

SOURCE_DOC = "where the text comes from: embedded | local_files | hf_dataset (the conf/data/ option)"


@params_section("data", option="embedded")
@dataclass(frozen=True)
class EmbeddedData:
    source: str = setting("embedded", SOURCE_DOC)
    world: WorldConfig = setting(WorldConfig(), "the seeded world of fictional people (llmpipe/data/world.py)")


@dataclass(frozen=True)
class UserData:
    """What local files and a Hugging Face dataset share: the text column, the validation split, the
    optional fine-tuning examples."""
    text_column: str = setting("text", "the text field of JSONL/Parquet rows or dataset rows")
    validation_fraction: float = setting(0.05, "share of documents held out as validation text", above=0, max=0.5)
    finetune_train: str | None = setting(None, "optional JSONL of fine-tuning examples (chat, Alpaca or "
                                               "prompt/completion)")
    finetune_validation: str | None = setting(None, "optional JSONL for validation; else a fraction of "
                                                    "finetune_train")
    finetune_validation_fraction: float = setting(0.1, "share of finetune_train held out when finetune_validation "
                                                       "is null", above=0, max=0.5)


@params_section("data", option="local_files")
@dataclass(frozen=True)
class LocalFilesData(UserData):
    source: str = setting("local_files", SOURCE_DOC)
    paths: list[str] = setting(["user_data/**/*.txt"], "globs (recursive **) of .txt/.md, .jsonl/.json or .parquet "
                                                       "files")
    txt_sample_by: str = setting("paragraph", "a .txt document is a: document (whole file) | paragraph | line",
                                 choices=list(TXT_SAMPLE_BY))


@params_section("data", option="hf_dataset")
@dataclass(frozen=True)
class HubData(UserData):
    source: str = setting("hf_dataset", SOURCE_DOC)
    name: str = setting("wikitext", "dataset name on the Hub, or a builder such as json/parquet/text")
    config: str | None = setting("wikitext-2-raw-v1", "dataset configuration (null for none)")
    split: str = setting("train", "split to read")
    revision: str | None = setting(None, "a git revision of the dataset repository, for reproducibility")
    data_files: list[str] | None = setting(None, "list of files for builders such as json/parquet (null for Hub "
                                                 "datasets)")
    streaming: bool = setting(False, "stream instead of downloading the whole split: true for corpora larger than "
                                     "memory or disk (prepare streams documents either way)")
    max_documents: int | None = setting(20000, "read at most this many rows (null for all)", min=1)


SOURCES = {"embedded": EmbeddedData, "local_files": LocalFilesData, "hf_dataset": HubData}


def data_settings(params: StageParams, seed: int) -> EmbeddedData | LocalFilesData | HubData:
    """The `data` section of the source it names (the world takes the pipeline's `seed`)."""
    source = params.value("data.source", str, choices=list(SOURCES))
    settings = params.read(SOURCES[source])
    if isinstance(settings, EmbeddedData):
        settings = replace(settings, world=replace(settings.world, seed=seed))
    return settings
