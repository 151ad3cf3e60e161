"""Settings of the training stages: the keys a training section shares (`TrainingParams`, which the one training
loop reads), the `pretrain` section, and what the pretrain stage builds from it, complete and checked before any
work starts (litgpt's args.py style). finetune's section extends the same keys in llmpipe.train.finetune_settings.

    settings = pretrain_settings(params, tokenizer_vocab_size)      # stages/pretrain.py
    train(model, settings.pretrain, ...)                            # llmpipe.train.loop

`BatchGeometry` says how a global batch splits into micro-batches and processes. Every error names the
params.yaml key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmpipe.config.params import StageParams, params_section, setting
from llmpipe.errors import ParamError, SettingError
from llmpipe.model.transformer import ModelConfig
from llmpipe.runner.distributed import ProcessInfo, check_device_available
from llmpipe.train.flops import measure_matmul_flops_per_second

DEVICES = ["auto", "cpu", "cuda"]
PARALLELISMS = ["ddp", "fsdp"]
PRECISIONS = ["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class TrainingParams:
    """The keys of a training section, which the one training loop reads (pretrain's; finetune's give some other
    defaults), and what a stage resolves before training starts (the last three fields: not params)."""
    processes: int = setting(1, "data-parallel processes per node (torchrun --nproc_per_node); the global batch "
                                "stays the same", min=1)
    nodes: int = setting(1, "machines (torchrun --nnodes; see docs/distributed.md); processes is per node", min=1)
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda", choices=DEVICES)
    parallelism: str = setting("ddp", "ddp (every process holds the whole model) | fsdp (FSDP2: weights, gradients "
                                      "and optimizer state sharded over the processes)", choices=PARALLELISMS)
    max_steps: int = setting(800, "optimizer steps", min=1)
    global_batch_sequences: int = setting(32, "sequences per optimizer step, across processes and accumulation",
                                          min=1)
    micro_batch_sequences: int = setting(32, "at most this many sequences per forward/backward pass in one process "
                                             "(accumulation makes up the rest; not part of a checkpoint)", min=1)
    learning_rate: float = setting(3e-3, "peak learning rate after warmup", above=0, max=10.0)
    min_learning_rate: float = setting(3e-4, "floor of the cosine decay", min=0)
    warmup_steps: int = setting(50, "linear warmup steps", min=0)
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only", min=0)
    beta1: float = setting(0.9, "AdamW first-moment decay", min=0, max=0.9999)
    beta2: float = setting(0.95, "AdamW second-moment decay", min=0, max=0.99999)
    grad_clip: float = setting(1.0, "max gradient norm (0 = no clipping)", min=0)
    log_every: int = setting(10, "training metrics every N steps", min=1)
    eval_every: int = setting(100, "validation loss / bits per byte every N steps", min=1)
    checkpoint_every: int = setting(100, "resumable checkpoint every N steps (0 = none)", min=0)
    precision: str = setting("auto", "auto (bf16 where the CPU/GPU has bf16 hardware, else fp32) | fp32 | bf16 "
                                     "(autocast)", choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile each transformer block (for GPUs)")
    peak_flops_per_second: float | None = None  # for model FLOPs utilization; None: not reported
    best_metric: str | None = None  # keep the weights of the best evaluation by this metric ...
    best_mode: str = "min"          # ... lower (min) or higher (max) is better

    def __post_init__(self):
        if self.learning_rate is not None and self.min_learning_rate is not None \
                and self.min_learning_rate > self.learning_rate:
            raise SettingError("min_learning_rate", f"{self.min_learning_rate} must not exceed learning_rate "
                                                    f"({self.learning_rate})")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be min or max, got {self.best_mode!r}")

    def on_device(self, device: torch.device, **resolved) -> "TrainingParams":
        """The section as the loop runs it on `device`: precision `auto` resolved, and what the stage resolved."""
        return replace(self, precision=resolve_precision(self.precision, device), **resolved)


@params_section("pretrain")
@dataclass(frozen=True)
class PretrainParams(TrainingParams):
    global_batch_tokens: int | None = setting(None, "alternatively tokens per step (a multiple of "
                                                    "model.context_length); overrides sequences", min=1)
    eval_max_tokens: int = setting(65536, "validation tokens evaluated (from the start of the split)", min=2)
    peak_flops_per_second: float | None = setting(None, "device peak for model FLOPs utilization; null = measure a "
                                                        "matmul at start", above=0)


@dataclass(frozen=True)
class BatchGeometry:
    """A global batch of `global_sequences`, in micro-batches of `micro_sequences`, shared by processes.

    The micro-batch is an execution detail, like the process count: the gradient is the global batch's whatever the
    split (llmpipe.train.loop), so a run may resume on more processes. When `micro_sequences` (the requested
    micro_batch_sequences) does not divide the global batch, or gives fewer micro-batches than the processes need
    (at least one each; under FSDP as many each), the largest micro-batch below it that does is used instead."""
    section: str                   # params section, for messages
    global_sequences: int
    micro_sequences: int           # requested; after construction, the one used
    world_size: int
    parallelism: str = "ddp"       # fsdp needs the same number of micro-batches in every process

    def __post_init__(self):
        usable = next((size for size in range(min(self.micro_sequences, self.global_sequences), 0, -1)
                       if self.global_sequences % size == 0 and self.shares(self.global_sequences // size)), None)
        if usable is None and self.parallelism == "fsdp":
            # Every FSDP forward and backward is a collective: the processes must run as many of them.
            raise ParamError(f"params.yaml: {self.section}.parallelism: fsdp needs {self.section}."
                             f"global_batch_sequences ({self.global_sequences}) to be a multiple of the "
                             f"{self.world_size} processes")
        if usable is None:
            raise ParamError(f"params.yaml: {self.section}.global_batch_sequences: {self.global_sequences} sequences "
                             f"cannot be shared by {self.world_size} processes (at least one each)")
        object.__setattr__(self, "micro_sequences", usable)

    def shares(self, micro_batches: int) -> bool:
        """Whether the processes can share this many micro-batches."""
        if self.parallelism == "fsdp":
            return micro_batches % self.world_size == 0
        return micro_batches >= self.world_size


def batch_geometry(section: str, global_sequences: int, micro_sequences: int, process: ProcessInfo,
                   parallelism: str) -> BatchGeometry:
    """The batch geometry of a training stage; says (on rank 0) when the micro-batch differs from the one asked for."""
    batch = BatchGeometry(section, global_sequences, micro_sequences, process.world_size, parallelism)
    if batch.micro_sequences != micro_sequences and process.is_main:
        print(f"{section}: micro-batches of {batch.micro_sequences} sequences, not {section}.micro_batch_sequences "
              f"{micro_sequences}: {global_sequences} sequences per step in {process.world_size} process(es) need it "
              "(the same gradient)", flush=True)
    return batch


VOCAB_SIZE_KEY = "model.vocab_size"


@dataclass(frozen=True)
class PretrainSettings:
    model: ModelConfig
    pretrain: PretrainParams       # the section, resolved for the loop (TrainingParams.on_device)
    batch: BatchGeometry
    process: ProcessInfo
    eval_max_tokens: int           # validation tokens evaluated
    seed: int

    def effective_params(self) -> dict:
        """The values used for the params that may be null (StageRun.log_effective_params logs those that were)."""
        return {VOCAB_SIZE_KEY: self.model.vocab_size, "model.head_dim": self.model.head_dim,
                "pretrain.global_batch_tokens": self.batch.global_sequences * self.model.context_length,
                "pretrain.peak_flops_per_second": self.pretrain.peak_flops_per_second}


def model_config(params: StageParams, tokenizer_vocab_size: int | None, preset_wins: bool = False) -> ModelConfig:
    """The `model` section → ModelConfig. `model.vocab_size: null` takes the tokenizer's size; a preset
    that fixes a vocabulary size (a published model's shape) must match the tokenizer to be trained
    (`preset_wins`: the preset's size is taken, for sizing a published shape)."""
    vocab_size = params.value(VOCAB_SIZE_KEY, int | None, min=1)
    if vocab_size is None:
        if tokenizer_vocab_size is None:
            raise ParamError(f"{params.source}: model.vocab_size is null and there is no tokenizer to take it from")
        vocab_size = tokenizer_vocab_size
    elif tokenizer_vocab_size is not None and vocab_size != tokenizer_vocab_size and not preset_wins:
        raise ParamError(f"{params.source}: model.vocab_size is {vocab_size} but the tokenizer has "
                         f"{tokenizer_vocab_size} tokens; set model.vocab_size: null to follow the tokenizer")
    return params.read(ModelConfig, vocab_size=vocab_size)


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32, bf16 (autocast: bf16 matmuls, fp32 weights and optimizer), or auto: bf16 where `device` multiplies
    in bf16 natively, fp32 elsewhere (where bf16 would be emulated, and slower)."""
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


def process_on(section: TrainingParams, source: str, name: str) -> ProcessInfo:
    """This process (rank, world size from torchrun) on the device the section asks for."""
    check_device_available(section.device, f"{name}.device", source)
    return ProcessInfo.from_environment(section.device)


def pretrain_settings(params: StageParams, tokenizer_vocab_size: int) -> PretrainSettings:
    """Everything the pretrain stage needs. With `pretrain.peak_flops_per_second: null` the device's matmul
    throughput is measured here, so the settings are complete before training starts."""
    model = model_config(params, tokenizer_vocab_size)
    section = params.read(PretrainParams)
    process = process_on(section, params.source, "pretrain")
    sequences = section.global_batch_sequences
    if section.global_batch_tokens is not None:
        if section.global_batch_tokens % model.context_length:
            raise ParamError(f"{params.source}: pretrain.global_batch_tokens ({section.global_batch_tokens}) must be a "
                             f"multiple of model.context_length ({model.context_length})")
        sequences = section.global_batch_tokens // model.context_length
    batch = batch_geometry("pretrain", sequences, section.micro_batch_sequences, process, section.parallelism)
    section = section.on_device(process.device)
    peak = section.peak_flops_per_second or measure_matmul_flops_per_second(
        process.device, torch.bfloat16 if section.precision == "bf16" else torch.float32)
    return PretrainSettings(model=model, pretrain=replace(section, peak_flops_per_second=peak), batch=batch,
                            process=process, eval_max_tokens=section.eval_max_tokens, seed=params.seed())
