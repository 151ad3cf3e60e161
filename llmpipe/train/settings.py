"""Settings of the training stages: read from params.yaml once, complete and checked before any work
starts, then frozen (litgpt's args.py style).

    settings = pretrain_settings(params, tokenizer_vocab_size)                    # stages/pretrain.py
    settings = finetune_settings(params, validation_people=..., validation_examples=...)  # stages/finetune.py

`TrainSettings` is what the training loop (llmpipe.train.loop) reads; `BatchGeometry` is how a global
batch splits into micro-batches and processes; the stage settings add the model, the process and the
stage's own keys. Every error names the params.yaml key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmpipe.lora import TARGETABLE, LoRASettings
from llmpipe.model import ModelConfig
from llmpipe.pipeline.distributed import ProcessInfo
from llmpipe.pipeline.errors import ParamError
from llmpipe.pipeline.params import StageParams
from llmpipe.train.flops import measure_matmul_flops_per_second

MODEL_KEYS = ("context_length", "n_layer", "d_model", "n_head", "n_kv_head", "ffn_hidden")
DEVICES = ["auto", "cpu", "cuda"]
PARALLELISMS = ["ddp", "fsdp"]
PRECISIONS = ["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int                 # optimizer steps
    learning_rate: float           # peak learning rate, reached after warmup
    min_learning_rate: float       # floor of the cosine decay
    warmup_steps: int              # linear warmup from 0
    weight_decay: float            # AdamW decoupled weight decay, on matrices only
    beta1: float                   # AdamW first-moment decay
    beta2: float                   # AdamW second-moment decay
    grad_clip: float               # max global gradient norm (0 disables)
    eval_every: int                # evaluate every N steps (and at the end)
    checkpoint_every: int          # checkpoint every N steps (0 disables)
    log_every: int = 10            # training metrics every N steps
    precision: str = "fp32"        # fp32 | bf16 (autocast); `auto` in params is resolved before this (precision_of)
    compile: bool = False          # torch.compile the model
    best_metric: str | None = None     # keep the weights of the best evaluation by this metric ...
    best_mode: str = "min"             # ... lower (min) or higher (max) is better
    peak_flops_per_second: float | None = None  # for model FLOPs utilization; None: not reported
    parallelism: str = "ddp"       # ddp (replicated weights) | fsdp (FSDP2 fully_shard per block); 1 process: plain

    def __post_init__(self):
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be min or max, got {self.best_mode!r}")


@dataclass(frozen=True)
class BatchGeometry:
    """A global batch of `global_sequences`, in micro-batches of `micro_sequences`, shared by processes."""
    section: str                   # params section, for messages
    global_sequences: int
    micro_sequences: int
    world_size: int
    parallelism: str = "ddp"       # fsdp needs the same number of micro-batches in every process

    def __post_init__(self):
        if self.global_sequences % self.micro_sequences:
            raise ParamError(f"params.yaml: {self.section}.global_batch_sequences ({self.global_sequences}) must be "
                             f"a multiple of {self.section}.micro_batch_sequences ({self.micro_sequences})")
        if self.global_sequences // self.micro_sequences < self.world_size:
            raise ParamError(f"params.yaml: {self.section}.global_batch_sequences / micro_batch_sequences = "
                             f"{self.global_sequences // self.micro_sequences} micro-batches cannot be shared by "
                             f"{self.world_size} processes")
        if self.parallelism == "fsdp" and (self.global_sequences // self.micro_sequences) % self.world_size:
            # Every FSDP forward and backward is a collective: the processes must run as many of them.
            raise ParamError(f"params.yaml: {self.section}.parallelism: fsdp needs global_batch_sequences / "
                             f"micro_batch_sequences = {self.global_sequences // self.micro_sequences} micro-batches "
                             f"to be a multiple of the {self.world_size} processes")


@dataclass(frozen=True)
class PretrainSettings:
    model: ModelConfig
    loop: TrainSettings
    batch: BatchGeometry
    process: ProcessInfo
    eval_max_tokens: int           # validation tokens evaluated
    seed: int


@dataclass(frozen=True)
class FinetuneSettings:
    method: str                    # chat_tokens | full | lora
    lora: LoRASettings | None      # None unless method is lora
    loop: TrainSettings
    batch: BatchGeometry
    process: ProcessInfo
    max_new_tokens: int            # longest generated answer when measuring QA accuracy
    sample_answers: int            # sample answers per split in the report
    seed: int


def model_config(params: StageParams, tokenizer_vocab_size: int | None) -> ModelConfig:
    """The `model` section → ModelConfig. `model.vocab_size: null` takes the tokenizer's size; a preset
    that fixes a vocabulary size (a published model's shape) must match the tokenizer to be trained."""
    values = {key: params.int(f"model.{key}", min=1) for key in MODEL_KEYS}
    vocab_size = params.get("model.vocab_size")
    if vocab_size is None:
        if tokenizer_vocab_size is None:
            raise ParamError(f"{params.source}: model.vocab_size is null and there is no tokenizer to take it from")
        vocab_size = tokenizer_vocab_size
    else:
        vocab_size = params.int("model.vocab_size", min=1)
        if tokenizer_vocab_size is not None and vocab_size != tokenizer_vocab_size:
            raise ParamError(f"{params.source}: model.vocab_size is {vocab_size} but the tokenizer has "
                             f"{tokenizer_vocab_size} tokens; set model.vocab_size: null to follow the tokenizer")
    head_dim = params.get("model.head_dim")
    try:
        return ModelConfig(
            vocab_size=vocab_size, **values,
            head_dim=None if head_dim is None else params.int("model.head_dim", min=2),
            rope_theta=params.float("model.rope_theta", above=0),
            rms_norm_eps=params.float("model.rms_norm_eps", above=0),
            tie_embeddings=params.bool("model.tie_embeddings"),
        )
    except ValueError as exc:
        raise ParamError(f"{params.source}: model: {exc}") from None


# Peak and floor learning rates of each fine-tuning method, taken when finetune.learning_rate or
# finetune.min_learning_rate is null (measured on the embedded world: docs/seeds.md).
FINETUNE_LEARNING_RATES = {"chat_tokens": (1e-2, 1e-3), "full": (3e-4, 1e-4), "lora": (3e-3, 1e-4)}


def loop_settings(params: StageParams, section: str, device: torch.device,
                  default_rates: tuple[float, float] | None = None, **extra) -> TrainSettings:
    """The loop keys of `section` (pretrain or finetune) for training on `device`; `extra` adds what is not a
    key of that section. With `default_rates` (peak, floor), a null learning_rate or min_learning_rate takes
    that value."""
    key = lambda name: f"{section}.{name}"  # noqa: E731

    def rate(name: str, default: float | None, **bounds) -> float:
        if default is not None and params.get(key(name)) is None:
            return default
        return params.float(key(name), **bounds)

    peak, floor = default_rates or (None, None)
    settings = TrainSettings(
        max_steps=params.int(key("max_steps"), min=1),
        learning_rate=rate("learning_rate", peak, above=0, max=10.0),
        min_learning_rate=rate("min_learning_rate", floor, min=0),
        warmup_steps=params.int(key("warmup_steps"), min=0),
        weight_decay=params.float(key("weight_decay"), min=0),
        beta1=params.float(key("beta1"), min=0, max=0.9999),
        beta2=params.float(key("beta2"), min=0, max=0.99999),
        grad_clip=params.float(key("grad_clip"), min=0),
        eval_every=params.int(key("eval_every"), min=1),
        checkpoint_every=params.int(key("checkpoint_every"), min=0),
        log_every=params.int(key("log_every"), min=1),
        precision=precision_of(params, section, device),
        compile=params.bool(key("compile")),
        parallelism=parallelism_of(params, section),
        **extra,
    )
    if settings.min_learning_rate > settings.learning_rate:
        raise ParamError(f"{params.source}: {key('min_learning_rate')} ({settings.min_learning_rate}) must not exceed "
                         f"{key('learning_rate')} ({settings.learning_rate})")
    return settings


def precision_of(params: StageParams, section: str, device: torch.device) -> str:
    """`{section}.precision`: fp32, bf16 (autocast: bf16 matmuls, fp32 weights and optimizer), or auto: bf16
    where `device` multiplies in bf16 natively, fp32 elsewhere (where bf16 would be emulated, and slower)."""
    requested = params.str(f"{section}.precision", choices=PRECISIONS)
    if requested != "auto":
        return requested
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Does `device` multiply bf16 matrices in hardware: a CUDA GPU from Ampere on (compute capability 8;
    `torch.cuda.is_bf16_supported()` also says yes to older GPUs, which emulate it), or a CPU with AVX512-BF16
    or AMX instructions."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPU-feature checks
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def parallelism_of(params: StageParams, section: str) -> str:
    """`{section}.parallelism`: ddp (DistributedDataParallel) | fsdp (FSDP2, weights sharded over processes)."""
    return params.str(f"{section}.parallelism", choices=PARALLELISMS)


def process_of(params: StageParams, section: str) -> ProcessInfo:
    """This process (rank, world size from torchrun) on the device `{section}.device` asks for."""
    params.int(f"{section}.processes", min=1)  # read by the stage's launch command in dvc.yaml
    params.int(f"{section}.nodes", min=1)  # read by the launch command too
    requested = params.str(f"{section}.device", choices=DEVICES)
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamError(f"{params.source}: {section}.device: cuda, but this PyTorch sees no CUDA device "
                         "(a CPU-only build, or no GPU); use auto or cpu")
    return ProcessInfo.from_environment(requested)


def global_batch_sequences(params: StageParams, context_length: int) -> int:
    """`pretrain.global_batch_tokens` (when set) or `pretrain.global_batch_sequences`, as sequences."""
    tokens = params.get("pretrain.global_batch_tokens", None)
    if tokens is None:
        return params.int("pretrain.global_batch_sequences", min=1)
    tokens = params.int("pretrain.global_batch_tokens", min=1)
    if tokens % context_length:
        raise ParamError(f"{params.source}: pretrain.global_batch_tokens ({tokens}) must be a multiple of "
                         f"model.context_length ({context_length})")
    return tokens // context_length


def pretrain_settings(params: StageParams, tokenizer_vocab_size: int) -> PretrainSettings:
    """Everything the pretrain stage needs. With `pretrain.peak_flops_per_second: null` the device's matmul
    throughput is measured here, so the settings are complete before training starts."""
    model = model_config(params, tokenizer_vocab_size)
    process = process_of(params, "pretrain")
    batch = BatchGeometry("pretrain", global_batch_sequences(params, model.context_length),
                          params.int("pretrain.micro_batch_sequences", min=1), process.world_size,
                          parallelism_of(params, "pretrain"))
    loop = loop_settings(params, "pretrain", process.device)
    if params.get("pretrain.peak_flops_per_second") is not None:
        peak = params.float("pretrain.peak_flops_per_second", above=0)
    else:
        dtype = torch.bfloat16 if loop.precision == "bf16" else torch.float32
        peak = measure_matmul_flops_per_second(process.device, dtype)
    return PretrainSettings(model=model, loop=replace(loop, peak_flops_per_second=peak),
                            batch=batch, process=process,
                            eval_max_tokens=params.int("pretrain.eval_max_tokens", min=2), seed=params.seed())


def lora_settings(params: StageParams) -> LoRASettings:
    return LoRASettings(rank=params.int("finetune.lora.rank", min=1),
                        alpha=params.float("finetune.lora.alpha", above=0),
                        dropout=params.float("finetune.lora.dropout", min=0, max=0.9),
                        target_modules=tuple(params.str_list("finetune.lora.target_modules", choices=list(TARGETABLE))))


def finetune_settings(params: StageParams, validation_people: bool, validation_examples: bool) -> FinetuneSettings:
    """Everything the finetune stage needs. The best step is picked by the validation people's QA
    accuracy when there are validation people (the embedded world), else by the validation answer loss,
    else the last step is kept."""
    method = params.str("finetune.method", choices=["chat_tokens", "full", "lora"])
    process = process_of(params, "finetune")
    batch = BatchGeometry("finetune", params.int("finetune.global_batch_sequences", min=1),
                          params.int("finetune.micro_batch_sequences", min=1), process.world_size,
                          parallelism_of(params, "finetune"))
    best_metric, best_mode = (("qa_accuracy_validation_people", "max") if validation_people
                              else ("val_answer_loss", "min") if validation_examples else (None, "min"))
    loop = loop_settings(params, "finetune", process.device, default_rates=FINETUNE_LEARNING_RATES[method],
                         best_metric=best_metric, best_mode=best_mode)
    if method == "chat_tokens":
        if loop.weight_decay > 0:
            raise ParamError(f"params.yaml: finetune.weight_decay is {loop.weight_decay}; finetune.method=chat_tokens "
                             "needs 0 (decay would also shrink the frozen rows of the embedding)")
        if batch.parallelism == "fsdp" and process.distributed:
            raise ParamError("params.yaml: finetune.method=chat_tokens trains a few embedding rows: use "
                             "finetune.parallelism=ddp (FSDP would shard the embedding those rows live in)")
    return FinetuneSettings(
        method=method, lora=lora_settings(params) if method == "lora" else None, loop=loop,
        batch=batch, process=process,
        max_new_tokens=params.int("finetune.max_new_tokens", min=1),
        sample_answers=params.int("finetune.sample_answers", min=0), seed=params.seed())
