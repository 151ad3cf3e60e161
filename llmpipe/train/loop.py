"""The one training loop of the project, used by pretraining and fine-tuning.

    result = train(model, settings.pretrain, batches, evaluate, process, run, checkpoints)

Per optimizer step: the batch source gives the step's global batch (a pure function of the step, so a resumed
run sees the data it would have seen); this process takes its share of the micro-batches (gradient
accumulation); the loss is the sum over target tokens divided by the global batch's target tokens, so any
split over processes gives the same gradient (the model computes it a chunk of tokens at a time, never holding
the logits of all of them: llmpipe.model.loss); then clipping, AdamW, warmup + cosine learning rate. Every
`eval_every` steps it evaluates (keeping the best weights if asked); every `checkpoint_every` steps it writes
a checkpoint. A NaN or infinite loss stops the run, naming the step (the run diverged); a model that ends no better than
chance is a result, flagged (`chance_level_warning`), not refused.

With several processes, `ddp` wraps the model in DistributedDataParallel and `fsdp` applies FSDP2's
`fully_shard` to every block, then the root (each process keeps 1/world_size of weights, gradients and
AdamW state); the returned `TrainResult.model` is then a plain copy gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from llmpipe.errors import PipelineError
from llmpipe.model.transformer import (
    IGNORE_INDEX,
    Transformer,
    compile_blocks,
    count_parameters,
)
from llmpipe.runner.distributed import ProcessInfo, all_reduce_sum, barrier
from llmpipe.tracking.stage_run import StageRun
from llmpipe.train.batches import BatchSource
from llmpipe.train.checkpoint import CheckpointStore
from llmpipe.train.flops import training_flops_per_token
from llmpipe.train.progress import Progress
from llmpipe.train.settings import TrainingParams


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


def learning_rate_at(step: int, s: TrainingParams) -> float:
    """Linear warmup over `warmup_steps`, then cosine from the peak down to the floor at `max_steps`."""
    if step < s.warmup_steps:
        return s.learning_rate * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return s.min_learning_rate + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (s.learning_rate - s.min_learning_rate)


def make_optimizer(model: torch.nn.Module, s: TrainingParams, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; norms' gains are not decayed."""
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (LoRA trains matrices only): torch.distributed.checkpoint cannot restore one.
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), foreach=False,
                             fused=device.type == "cuda")


def shards(settings: TrainingParams, process: ProcessInfo) -> bool:
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
    """The weights now. Sharded: gathered whole on rank 0, in CPU memory (a collective; {} on the others).
    Not sharded: the trained weights only (frozen ones cannot change: LoRA's base, chat_tokens' other rows),
    so keeping the best step costs no second copy of a frozen model."""
    if sharded:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trained}


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


def train(model: Transformer, settings: TrainingParams, batches: BatchSource,
          evaluate: Callable[[Transformer], dict[str, float]], process: ProcessInfo, run: StageRun,
          checkpoints: CheckpointStore | None) -> TrainResult:
    """Train `model` in place; on return it holds the final weights, or the best ones with `best_metric`
    (under FSDP `model` stays sharded: use `result.model`, the whole model on rank 0)."""
    training = Training(model, settings, process, run, checkpoints)
    start_step = training.resume()
    progress = Progress(run.stage, settings.max_steps, start_step, enabled=process.is_main)
    model.train()
    for step in range(start_step, settings.max_steps):
        train_loss = training.step(step, batches.global_batch(step))
        done = step + 1
        training.log(done, train_loss)
        progress.step(done, train_loss, training.tokens_per_second)
        if done % settings.eval_every == 0 or done == settings.max_steps:
            progress.evaluation(done, training.evaluate(done, evaluate))
        if checkpoints and settings.checkpoint_every and done % settings.checkpoint_every == 0 \
                and done < settings.max_steps:
            training.checkpoint(done)
    progress.close()
    return training.finish()


class Training:
    """One training run's state, step by step: the (wrapped) model, optimizer, curves, best weights and the
    throughput window. `train` drives it."""

    def __init__(self, model: Transformer, settings: TrainingParams, process: ProcessInfo, run: StageRun,
                 checkpoints: CheckpointStore | None):
        model.to(process.device)
        self.model, self.settings, self.process, self.run, self.checkpoints = model, settings, process, run, checkpoints
        self.sharded = shards(settings, process)
        self.flops_per_token = training_flops_per_token(model.config, count_parameters(model))
        self.skeleton = _meta_copy(model) if self.sharded and process.is_main else None
        self.train_model: torch.nn.Module = model
        if self.sharded:
            self.train_model = fully_shard_blocks(model, process)
        elif process.distributed:
            self.train_model = DistributedDataParallel(
                model, device_ids=[process.device.index] if process.device.type == "cuda" else None)
        self.optimizer = make_optimizer(model, settings, process.device)  # on the shards under FSDP
        self.result = TrainResult(steps=settings.max_steps, history={"train": [], "eval": []})
        self.best_score, self.best_state = None, None
        self.autocast = torch.autocast(process.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
        self.window_start, self.window_tokens, self.tokens_per_second = time.perf_counter(), 0, None

    def resume(self) -> int:
        """Continue from the latest checkpoint, if any (any process count: DCP reshards); the first step to run."""
        latest = self.checkpoints.latest() if self.checkpoints else None
        start_step = 0
        if latest is not None:
            state = self.checkpoints.load(latest, self.model, self.optimizer)
            start_step = state["step"]
            self.result.history = state["history"]
            self.result.best_step = state.get("best_step")
            self.best_score = state.get("best_score")
            self.result.resumed_from = start_step
            if self.settings.best_metric and self.result.best_step is not None:
                self.best_state = _load_best(self.checkpoints, self.model, self.result.best_step, start_step,
                                             self.sharded, self.process)
            if self.process.is_main:
                print(f"resuming from checkpoint {latest} (step {start_step})", flush=True)
                for row in self.result.history["train"] + self.result.history["eval"]:  # complete MLflow's curves
                    self.run.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.settings.compile:
            compile_blocks(self.model)
        self.window_start = time.perf_counter()
        return start_step

    def step(self, step: int, global_batch: list) -> float:
        """One optimizer step on this process's share of the global batch; returns the batch's mean loss."""
        lr = learning_rate_at(step, self.settings)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        process = self.process
        mine = global_batch[process.rank::process.world_size]  # BatchGeometry checked there is one at least
        target_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in global_batch)
        if target_tokens == 0:
            raise PipelineError(f"step {step + 1}: no token of the global batch has a training target (every "
                                "label is masked); check the data and the context length")
        loss_sum = torch.zeros((), device=process.device)
        for index, (inputs, targets) in enumerate(mine):
            inputs, targets = inputs.to(process.device), targets.to(process.device)
            ddp_accumulating = process.distributed and not self.sharded and index < len(mine) - 1
            sync = self.train_model.no_sync() if ddp_accumulating else contextlib.nullcontext()
            with sync, self.autocast:
                _, loss = self.train_model(inputs, targets, loss_reduction="sum")
                # DDP and FSDP average gradients over processes: scale so the result is sum / target_tokens.
                (loss * process.world_size / target_tokens).backward()
            loss_sum += loss.detach().float()
            self.window_tokens += inputs.numel()
        train_loss = float(all_reduce_sum(loss_sum)) / target_tokens
        if not math.isfinite(train_loss):
            kept = self.checkpoints.latest() if self.checkpoints else None
            raise PipelineError(f"training diverged: loss is {train_loss} at step {step + 1}; "
                                + (f"last good checkpoint kept at {kept}" if kept else "no checkpoint was written yet")
                                + "; lower the learning rate or raise warmup")
        self.grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
                          if self.settings.grad_clip > 0 else torch.zeros(()))
        if isinstance(self.grad_norm, DTensor):  # FSDP: the norm over every shard, computed by a collective
            self.grad_norm = self.grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.learning_rate = lr
        return train_loss

    def log(self, done: int, train_loss: float) -> None:
        """Every `log_every` steps (and the last): loss, learning rate, gradient norm, throughput, MFU."""
        if done % self.settings.log_every and done != self.settings.max_steps:
            return
        elapsed = time.perf_counter() - self.window_start
        self.tokens_per_second = self.window_tokens * self.process.world_size / max(elapsed, 1e-9)
        row = {"step": done, "train_loss": train_loss, "learning_rate": self.learning_rate,
               "grad_norm": float(self.grad_norm), "tokens_per_second": self.tokens_per_second}
        if self.settings.peak_flops_per_second:
            row["model_flops_utilization"] = self.flops_per_token * self.tokens_per_second / (
                self.settings.peak_flops_per_second * self.process.world_size)
        self.result.history["train"].append(row)
        self.run.log_metrics({k: v for k, v in row.items() if k != "step"}, step=done)
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def evaluate(self, done: int, evaluate: Callable[[Transformer], dict[str, float]]) -> dict[str, float]:
        """Evaluate, record, and keep the weights when they are the best so far by `best_metric`."""
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = evaluate(self.model)
        self.model.train()
        self.result.history["eval"].append({"step": done, **metrics})
        self.run.log_metrics(metrics, step=done)
        if self.settings.best_metric:
            score = metrics[self.settings.best_metric]
            better = self.best_score is None or (score < self.best_score if self.settings.best_mode == "min"
                                                 else score > self.best_score)
            if better:
                self.best_score, self.result.best_step = score, done
                self.best_state = _snapshot(self.model, self.sharded)
        return metrics

    def checkpoint(self, done: int) -> None:
        """A resumable checkpoint: every process writes its shard; rank 0 also the best weights so far."""
        self.checkpoints.save(done, self.model, self.optimizer, {
            "history": self.result.history, "best_step": self.result.best_step, "best_score": self.best_score})
        if self.process.is_main and self.best_state is not None:
            self.checkpoints.save_best(self.best_state, self.result.best_step)
        barrier()

    def finish(self) -> TrainResult:
        """The result: the best (or final) weights as a plain model (gathered on rank 0 under FSDP), and the last
        evaluation's metrics."""
        result = self.result
        if self.sharded:
            final_state = self.best_state if self.best_state is not None else _snapshot(self.model, self.sharded)
            result.model = _materialize(self.skeleton, final_state) if self.process.is_main else None
        else:
            if self.best_state is not None:
                self.model.load_state_dict(self.best_state, strict=False)
            result.model = self.model
        result.final_metrics = dict(result.history["eval"][-1]) if result.history["eval"] else {}
        result.final_metrics.pop("step", None)
        if result.history["train"]:
            result.final_metrics["train_loss"] = result.history["train"][-1]["train_loss"]
        return result


UNIFORM_MARGIN = 1e-4  # a trained model's loss must be below the uniform distribution's by this fraction at least


def chance_level_warning(stage: str, loss_key: str, metrics: dict[str, float], vocab_size: int) -> str | None:
    """Say so when a training stage's model predicts no better than the uniform distribution over the vocabulary
    (what broken numerics give, e.g. a huge RMSNorm epsilon: exactly uniform outputs, or a learning rate too low to
    move): its validation loss is not below ln(vocab_size) by UNIFORM_MARGIN of it; None when it is. A poor result
    is still a result: the stage records it (llmpipe.report.publish.flag_chance_level), it does not refuse it.
    (The unigram baseline is the wrong bar: a real but short run, the tiny test pipeline's 6 steps, does not beat
    it yet.)"""
    loss, uniform = metrics.get(loss_key), math.log(vocab_size)
    if loss is None or loss < uniform * (1 - UNIFORM_MARGIN):
        return None
    bits = ""
    if "val_bpb" in metrics:  # the same tokens and bytes: bits per byte scale as the losses
        bits = f"; val_bpb {metrics['val_bpb']:.4f}, uniform {metrics['val_bpb'] * uniform / loss:.4f}"
    return (f"{stage}: the trained model predicts no better than chance: {loss_key} {loss:.4f} is not below "
            f"{uniform:.4f} = ln({vocab_size}), the loss of the uniform distribution over the vocabulary{bits} "
            "(check the model's params, e.g. rms_norm_eps, and the learning rate)")


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
