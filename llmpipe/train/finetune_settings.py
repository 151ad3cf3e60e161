"""Settings of the finetune stage: the `finetune` section, its LoRA adapters included, and what the stage builds
from it, complete and checked before any work starts. The keys it shares with pretraining, which the training
loop reads: llmpipe.train.settings.TrainingParams."""

from __future__ import annotations

from dataclasses import dataclass

from llmpipe.config.params import StageParams, params_section, setting
from llmpipe.errors import ParamError, SettingError
from llmpipe.model.lora import TARGETABLE
from llmpipe.runner.distributed import ProcessInfo
from llmpipe.train.settings import (
    PRECISIONS,
    BatchGeometry,
    TrainingParams,
    batch_geometry,
    process_on,
)

METHODS = ["chat_tokens", "full", "lora"]
# Peak and floor learning rates of each fine-tuning method, taken when finetune.learning_rate is null (measured on
# the embedded world: docs/seeds.md). A null min_learning_rate under a set learning_rate keeps the method's ratio.
FINETUNE_LEARNING_RATES = {"chat_tokens": (1e-2, 1e-3), "full": (3e-4, 1e-4), "lora": (3e-3, 1e-4)}


@dataclass(frozen=True)
class LoRASettings:
    rank: int = setting(16, "rank of each adapter's update", min=1)
    alpha: float = setting(32.0, "update scale is alpha / rank", above=0)
    dropout: float = setting(0.0, "dropout on the adapters' input", min=0, max=0.9)
    target_modules: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "o_proj"), "layers that get adapters "
                                              "(also: gate_proj, up_proj, down_proj)", choices=list(TARGETABLE),
                                              unique=True)
    base_bits: int = setting(16, "the frozen weights under the adapters: 16 (as stored) | 4 (NF4 through torchao: "
                                 "QLoRA, about a quarter of bf16's memory; the adapters merge into the stored "
                                 "weights)", choices=[16, 4])


@params_section("finetune")
@dataclass(frozen=True)
class FinetuneParams(TrainingParams):
    method: str = setting("chat_tokens", "chat_tokens (only the chat tokens' embeddings) | full (every weight) | lora",
                          choices=METHODS)
    lora: LoRASettings = setting(LoRASettings(), "the adapters of method lora", used_when=("method", "lora"))
    max_steps: int = setting(200, "optimizer steps", min=1)
    learning_rate: float | None = setting(None, "peak after warmup; null: the method's (chat_tokens 1e-2, full 3e-4, "
                                                "lora 3e-3)", above=0, max=10.0)
    min_learning_rate: float | None = setting(None, "floor of the cosine decay; null: the method's (1e-3, 1e-4, "
                                                    "1e-4), scaled with a set learning_rate", min=0)
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
        """Null learning rates become the method's (the loop reads numbers); then TrainingParams' checks."""
        peak, floor = FINETUNE_LEARNING_RATES[self.method]
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", peak)
        if self.min_learning_rate is None:
            object.__setattr__(self, "min_learning_rate", floor if self.learning_rate == peak
                               else self.learning_rate * floor / peak)
        super().__post_init__()
        if self.method == "chat_tokens" and self.weight_decay > 0:
            raise SettingError("weight_decay", f"method chat_tokens needs 0, got {self.weight_decay} (decay would also "
                                               "shrink the frozen rows of the embedding)")


@dataclass(frozen=True)
class FinetuneSettings:
    finetune: FinetuneParams       # the section, learning rates resolved, as the loop runs it (on_device)
    batch: BatchGeometry
    process: ProcessInfo
    seed: int

    @property
    def lora(self) -> LoRASettings | None:
        """The adapters, when the method is lora."""
        return self.finetune.lora if self.finetune.method == "lora" else None


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
    section = section.on_device(process.device, best_metric=best_metric, best_mode=best_mode)
    if section.method == "lora" and section.lora.base_bits == 4 and process.distributed:
        raise ParamError(f"{params.source}: finetune.lora.base_bits=4 (QLoRA) runs in one process: set "
                         "finetune.processes=1 and finetune.nodes=1")
    if section.method == "chat_tokens" and batch.parallelism == "fsdp" and process.distributed:
        raise ParamError(f"{params.source}: finetune.method=chat_tokens trains a few embedding rows: use "
                         "finetune.parallelism=ddp (FSDP would shard the embedding those rows live in)")
    return FinetuneSettings(finetune=section, batch=batch, process=process, seed=params.seed())
