"""The one training loop of the project, used by pretraining and fine-tuning.

    result = train(model, settings.loop, batches, evaluate, process, run, checkpoints)

Per optimizer step:
1. the batch source gives the step's *global* batch as a list of micro-batches (a pure function of
   the step number, so a resumed run sees exactly the data it would have seen);
2. this process takes its share (micro-batches rank, rank + world_size, ...), runs forward/backward
   on each (gradient accumulation; DDP synchronizes on the last one only, FSDP reduce-scatters every
   backward into the gradient shards, so no process ever holds a whole unsharded gradient for long);
3. the loss is the sum over target tokens divided by the number of target tokens in the whole global
   batch, so 1 process × 8 micro-batches and 2 processes × 4 give the same gradient (DDP and FSDP
   both average over processes: the loss is scaled by world_size);
4. gradient clipping, AdamW (weight decay on matrices only), learning rate by linear warmup then
   cosine decay to a floor.
Every `eval_every` steps it evaluates, keeps the best weights if asked to, and logs; every
`checkpoint_every` steps it writes a checkpoint (torch.distributed.checkpoint: every process its
shard). A NaN or infinite loss stops the run with a message naming the step; the last good checkpoint
stays.

Parallelism (`settings.parallelism`, with more than one process): `ddp` wraps the model in
DistributedDataParallel; `fsdp` applies FSDP2's `fully_shard` to every transformer block, then to the
root (embeddings, final norm, head), so each process keeps 1/world_size of the weights, gradients and
AdamW moments, and the optimizer steps on the shards (DTensors). With one process both train the plain
model (sharding over one process saves nothing). Everything else (data, loss scaling, clipping,
schedule, evaluation) is the same code. Under FSDP the returned `TrainResult.model` is a plain copy
gathered on rank 0 (None on the others); otherwise it is `model` itself.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from llmpipe.model import IGNORE_INDEX, Transformer, compile_blocks, count_parameters
from llmpipe.pipeline.distributed import ProcessInfo, all_reduce_sum, barrier
from llmpipe.pipeline.errors import PipelineError
from llmpipe.pipeline.tracking import StageRun
from llmpipe.train.batches import BatchSource
from llmpipe.train.checkpoint import CheckpointStore
from llmpipe.train.flops import training_flops_per_token
from llmpipe.train.progress import Progress
from llmpipe.train.settings import TrainSettings


@dataclass
class TrainResult:
    steps: int
    history: dict[str, list[dict]] = field(default_factory=dict)   # "train" and "eval" rows
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    resumed_from: int | None = None
    model: torch.nn.Module | None = None  # the trained (or best) model, unsharded; None on ranks > 0 under FSDP

    def mean_of(self, key: str) -> float | None:
        """Mean of a training-curve column (e.g. tokens_per_second) over the logged steps."""
        values = [row[key] for row in self.history.get("train", []) if key in row]
        return sum(values) / len(values) if values else None


def learning_rate_at(step: int, s: TrainSettings) -> float:
    """Linear warmup over `warmup_steps`, then cosine from the peak down to the floor at `max_steps`."""
    if step < s.warmup_steps:
        return s.learning_rate * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return s.min_learning_rate + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (s.learning_rate - s.min_learning_rate)


def make_optimizer(model: torch.nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; norms' gains are not decayed."""
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (LoRA trains matrices only): torch.distributed.checkpoint cannot restore one.
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), foreach=False,
                             fused=device.type == "cuda")


def shards(settings: TrainSettings, process: ProcessInfo) -> bool:
    """Whether this run shards the model with FSDP2 (fsdp asked for, and more than one process)."""
    return settings.parallelism == "fsdp" and process.distributed


def fully_shard_blocks(model: Transformer, process: ProcessInfo) -> Transformer:
    """FSDP2: every transformer block is one unit (all-gathered for its forward and backward, resharded
    after), the root holds the rest (embeddings, tied head, final norm). Frozen weights (LoRA) stay frozen."""
    mesh = init_device_mesh(process.device.type, (process.world_size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _snapshot(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The weights now. Sharded: gathered whole on rank 0, in CPU memory (a collective; {} on the others)."""
    if sharded:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The module's structure with its parameters on the meta device (no memory), buffers copied."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _materialize(skeleton: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Fill a `_meta_copy` with a full state dict; tied parameters stay tied."""
    tied = {}
    first: dict[int, str] = {}
    for name, parameter in skeleton.named_parameters(remove_duplicate=False):
        tied[name] = first.setdefault(id(parameter), name)
    skeleton.load_state_dict(state, strict=True, assign=True)
    for name, target in tied.items():
        if name != target:
            owner, _, attribute = name.rpartition(".")
            setattr(skeleton.get_submodule(owner), attribute, skeleton.get_parameter(target))
    return skeleton.cpu()


def train(model: Transformer, settings: TrainSettings, batches: BatchSource,
          evaluate: Callable[[Transformer], dict[str, float]], process: ProcessInfo, run: StageRun,
          checkpoints: CheckpointStore | None) -> TrainResult:
    """Train `model` in place; on return it holds the final weights, or the best ones with `best_metric`
    (under FSDP `model` stays sharded: use `result.model`, the whole model on rank 0)."""
    model.to(process.device)
    sharded = shards(settings, process)
    flops_per_token = training_flops_per_token(model.config, count_parameters(model))
    skeleton = _meta_copy(model) if sharded and process.is_main else None
    train_model: torch.nn.Module = model
    if sharded:
        train_model = fully_shard_blocks(model, process)
    elif process.distributed:
        train_model = DistributedDataParallel(model, device_ids=[process.device.index] if process.device.type == "cuda" else None)
    optimizer = make_optimizer(model, settings, process.device)  # on the shards under FSDP
    result = TrainResult(steps=settings.max_steps, history={"train": [], "eval": []})
    best_score, best_state = None, None
    start_step = 0

    latest = checkpoints.latest() if checkpoints else None
    if latest is not None:
        state = checkpoints.load(latest, model, optimizer)  # any process count: DCP reshards
        start_step = state["step"]
        result.history = state["history"]
        result.best_step = state.get("best_step")
        best_score = state.get("best_score")
        result.resumed_from = start_step
        if settings.best_metric and result.best_step is not None:
            best_state = _load_best(checkpoints, model, result.best_step, start_step, sharded, process)
        if process.is_main:
            print(f"resuming from checkpoint {latest} (step {start_step})", flush=True)
            for row in result.history["train"] + result.history["eval"]:  # complete the curves in MLflow
                run.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    if settings.compile:
        compile_blocks(model)
    autocast = torch.autocast(process.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")

    window_start, window_tokens = time.perf_counter(), 0
    progress = Progress(run.stage, settings.max_steps, start_step, enabled=process.is_main)
    tokens_per_second = None
    model.train()
    for step in range(start_step, settings.max_steps):
        lr = learning_rate_at(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        global_batch = batches.global_batch(step)
        mine = global_batch[process.rank::process.world_size]  # BatchGeometry checked there is one at least
        target_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in global_batch)
        if target_tokens == 0:
            raise PipelineError(f"step {step + 1}: no token of the global batch has a training target (every "
                                "label is masked); check the data and the context length")
        loss_sum = torch.zeros((), device=process.device)
        for index, (inputs, targets) in enumerate(mine):
            inputs, targets = inputs.to(process.device), targets.to(process.device)
            last = index == len(mine) - 1
            ddp_accumulating = process.distributed and not sharded and not last
            sync = train_model.no_sync() if ddp_accumulating else contextlib.nullcontext()
            with sync, autocast:
                _, loss = train_model(inputs, targets, loss_reduction="sum")
                # DDP and FSDP average gradients over processes: scale so the result is sum / target_tokens.
                (loss * process.world_size / target_tokens).backward()
            loss_sum += loss.detach().float()
            window_tokens += inputs.numel()
        train_loss = float(all_reduce_sum(loss_sum)) / target_tokens
        if not math.isfinite(train_loss):
            kept = checkpoints.latest() if checkpoints else None
            raise PipelineError(f"training diverged: loss is {train_loss} at step {step + 1}; "
                                + (f"last good checkpoint kept at {kept}" if kept else "no checkpoint was written yet")
                                + "; lower the learning rate or raise warmup")
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                     if settings.grad_clip > 0 else torch.zeros(()))
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every shard, computed by a collective
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if done % settings.log_every == 0 or done == settings.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_second = window_tokens * process.world_size / max(elapsed, 1e-9)
            row = {"step": done, "train_loss": train_loss, "learning_rate": lr, "grad_norm": float(grad_norm),
                   "tokens_per_second": tokens_per_second}
            if settings.peak_flops_per_second:
                row["model_flops_utilization"] = flops_per_token * tokens_per_second / (
                    settings.peak_flops_per_second * process.world_size)
            result.history["train"].append(row)
            run.log_metrics({k: v for k, v in row.items() if k != "step"}, step=done)
            window_start, window_tokens = time.perf_counter(), 0
        progress.step(done, train_loss, tokens_per_second)

        if done % settings.eval_every == 0 or done == settings.max_steps:
            model.eval()
            with torch.no_grad(), autocast:
                metrics = evaluate(model)
            model.train()
            result.history["eval"].append({"step": done, **metrics})
            run.log_metrics(metrics, step=done)
            progress.evaluation(done, metrics)
            if settings.best_metric:
                score = metrics[settings.best_metric]
                better = best_score is None or (score < best_score if settings.best_mode == "min" else score > best_score)
                if better:
                    best_score, result.best_step, best_state = score, done, _snapshot(model, sharded)

        if checkpoints and settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.max_steps:
            checkpoints.save(done, model, optimizer, {"history": result.history, "best_step": result.best_step,
                                                      "best_score": best_score})  # every process: its shard
            if process.is_main and best_state is not None:
                checkpoints.save_best(best_state, result.best_step)
            barrier()

    progress.close()
    if sharded:  # gather the whole model on rank 0, as a plain module
        final_state = best_state if best_state is not None else _snapshot(model, sharded)
        result.model = _materialize(skeleton, final_state) if process.is_main else None
    else:
        if best_state is not None:
            model.load_state_dict(best_state)
        result.model = model
    result.final_metrics = dict(result.history["eval"][-1]) if result.history["eval"] else {}
    result.final_metrics.pop("step", None)
    if result.history["train"]:
        result.final_metrics["train_loss"] = result.history["train"][-1]["train_loss"]
    return result


def _load_best(checkpoints: CheckpointStore, model: Transformer, best_step: int, current_step: int,
               sharded: bool, process: ProcessInfo):
    if best_step == current_step:
        return _snapshot(model, sharded)
    if sharded:  # the best weights are only ever used whole, on rank 0, at the end
        return checkpoints.load_best() if process.is_main else {}
    tensors = checkpoints.load_best()
    snapshot = _snapshot(model, sharded)
    snapshot.update({k: v.to(snapshot[k].device) for k, v in tensors.items()})
    return snapshot
