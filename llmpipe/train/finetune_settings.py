"""Settings of the finetune stage: the `finetune` section (declared once, below) and what the stage builds from
it, complete and checked before any work starts. What it shares with pretraining: llmpipe.train.settings."""

from __future__ import annotations

from dataclasses import dataclass

from llmpipe.config.params import StageParams, params_section, setting
from llmpipe.errors import ParamError, SettingError
from llmpipe.model.lora import LoRASettings
from llmpipe.runner.distributed import ProcessInfo
from llmpipe.train.settings import (
    PRECISIONS,
    BatchGeometry,
    TrainingParams,
    TrainSettings,
    batch_geometry,
    loop_settings,
    process_on,
)

METHODS = ["chat_tokens", "full", "lora"]
# Peak and floor learning rates of each fine-tuning method, taken when finetune.learning_rate or
# finetune.min_learning_rate is null (measured on the embedded world: docs/seeds.md).
FINETUNE_LEARNING_RATES = {"chat_tokens": (1e-2, 1e-3), "full": (3e-4, 1e-4), "lora": (3e-3, 1e-4)}


@params_section("finetune")
@dataclass(frozen=True)
class FinetuneParams(TrainingParams):
    method: str = setting("chat_tokens", "chat_tokens (only the chat tokens' embeddings) | full (every weight) | lora",
                          choices=METHODS)
    lora: LoRASettings = setting(LoRASettings(), "the adapters of method lora")
    max_steps: int = setting(200, "optimizer steps", min=1)
    learning_rate: float | None = setting(None, "peak after warmup; null: the method's (chat_tokens 1e-2, full 3e-4, "
                                                "lora 3e-3)", above=0, max=10.0)
    min_learning_rate: float | None = setting(None, "floor of the cosine decay; null: the method's (1e-3, 1e-4, "
                                                    "1e-4)", min=0)
    warmup_steps: int = setting(10, "linear warmup steps", min=0)
    weight_decay: float = setting(0.0, "AdamW weight decay, on matrices only (chat_tokens needs 0)", min=0)
    log_every: int = setting(5, "training metrics every N steps", min=1)
    eval_every: int = setting(10, "validation loss and validation people's QA accuracy every N steps (picks the "
                                  "best step)", min=1)
    checkpoint_every: int = setting(50, "resumable checkpoint every N steps (0 = none)", min=0)
    precision: str = setting("fp32", "fp32 | bf16 (autocast) | auto (as pretrain.precision)", choices=PRECISIONS)
    max_new_tokens: int = setting(24, "longest generated answer when measuring QA accuracy", min=1)
    pad_prompts: bool = setting(False, "answer questions of all lengths in one batch, left-padded (one decoding "
                                       "pass instead of one per length: for large models; last digits of logits "
                                       "may differ)")
    max_questions_per_split: int | None = setting(None, "QA questions asked per split before, during and after "
                                                        "training: the first N of each file (null = all)", min=1)
    max_validation_examples: int | None = setting(None, "validation examples for the answer loss: the first N "
                                                        "(null = all)", min=1)
    measure_base: bool = setting(True, "measure the base model before training (QA accuracy, answer loss); false "
                                       "saves that time on large models")
    sample_answers: int = setting(8, "sample answers per split in reports/finetune/samples.md", min=0)

    def __post_init__(self):
        if self.method == "chat_tokens" and self.weight_decay > 0:
            raise SettingError("weight_decay", f"method chat_tokens needs 0, got {self.weight_decay} (decay would also "
                                               "shrink the frozen rows of the embedding)")


@dataclass(frozen=True)
class FinetuneSettings:
    method: str                    # chat_tokens | full | lora
    lora: LoRASettings | None      # None unless method is lora
    loop: TrainSettings
    batch: BatchGeometry
    process: ProcessInfo
    max_new_tokens: int            # longest generated answer when measuring QA accuracy
    pad_prompts: bool              # questions of all lengths in one batch
    max_questions_per_split: int | None   # QA questions per split (None: all)
    max_validation_examples: int | None   # validation examples for the answer loss (None: all)
    measure_base: bool             # measure the base model before training
    sample_answers: int            # sample answers per split in the report
    seed: int


def finetune_settings(params: StageParams, validation_people: bool, validation_examples: bool) -> FinetuneSettings:
    """Everything the finetune stage needs. The best step is picked by the validation people's QA
    accuracy when there are validation people (the embedded world), else by the validation answer loss,
    else the last step is kept."""
    section = params.read(FinetuneParams)
    process = process_on(section, params.source, "finetune")
    batch = batch_geometry("finetune", section.global_batch_sequences, section.micro_batch_sequences, process,
                           section.parallelism)
    best_metric, best_mode = (("qa_accuracy_validation_people", "max") if validation_people
                              else ("val_answer_loss", "min") if validation_examples else (None, "min"))
    peak, floor = FINETUNE_LEARNING_RATES[section.method]
    rates = (peak if section.learning_rate is None else section.learning_rate,
             floor if section.min_learning_rate is None else section.min_learning_rate)
    loop = loop_settings(section, "finetune", params.source, process.device, rates, best_metric=best_metric,
                         best_mode=best_mode)
    if section.method == "chat_tokens" and batch.parallelism == "fsdp" and process.distributed:
        raise ParamError(f"{params.source}: finetune.method=chat_tokens trains a few embedding rows: use "
                         "finetune.parallelism=ddp (FSDP would shard the embedding those rows live in)")
    return FinetuneSettings(
        method=section.method, lora=section.lora if section.method == "lora" else None, loop=loop,
        batch=batch, process=process, max_new_tokens=section.max_new_tokens, pad_prompts=section.pad_prompts,
        max_questions_per_split=section.max_questions_per_split, max_validation_examples=section.max_validation_examples,
        measure_base=section.measure_base, sample_answers=section.sample_answers, seed=params.seed())
