"""Peak memory of training: DDP against FSDP2 (`pretrain.parallelism`), or the chunked loss against the
full-logits one and transformers' LlamaForCausalLM (`--compare loss`).

`--compare parallelism` (the default): for each parallelism, launches N processes (llmpipe.runner.launch: torch's elastic launcher, gloo on
CPU) that each build the preset's model, train it for a few steps with the project's training loop
(llmpipe.train.loop.train, random tokens, AdamW) and report their peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`): once after the training steps ("training") and once after
train() returned ("with output"; under FSDP rank 0 then also holds the whole model gathered for the
stage's output file). DDP keeps weights, gradients and both AdamW moments whole in every process; FSDP
keeps 1/N of each, plus one block's gathered weights at a time. Prints a table and the FSDP/DDP ratios.

    python benchmarks/train_memory.py                               # medium preset, 2 processes, CPU
    python benchmarks/train_memory.py --preset large --steps 2      # bigger model, bigger gap
    python benchmarks/train_memory.py --processes 4 --context 64

Peak RSS includes the Python interpreter and torch (a few hundred MB, the same for both) and the whole
model each process builds before FSDP shards it. It also counts memory that glibc's malloc keeps after
torch freed it: FSDP allocates and frees every block's gathered weights in each forward and backward, and
with glibc's default (dynamic) mmap threshold those frees stay in the process's heap, so RSS hardly shows
the sharding. The workers therefore run with MALLOC_MMAP_THRESHOLD_=131072 (large blocks are mmapped and
given back when freed), for DDP and FSDP alike; `--malloc-mmap-threshold 0` measures glibc's default.

`--compare loss`: one process per variant, at a Llama 3 shape cut down to fit a CPU (the llama3_8b preset's
128,256-token vocabulary and untied head, 2 layers of width 256 by default): llmpipe with its chunked loss
(llmpipe.model.loss), llmpipe with the loss from all logits at once (`Transformer.full_logits_loss`), and
transformers' LlamaForCausalLM of the same shape (`labels=`, its own loss over all logits), the same batch of
random tokens, the same autocast and AdamW. Each trains `--steps` steps after one warm-up step; it reports its
peak RSS and its tokens/s over the measured steps. The variants alternate for `--rounds` rounds (the best
tokens/s and the highest peak of each are kept), so background load hits all alike.

    python benchmarks/train_memory.py --compare loss                          # 4 × 512 tokens, bf16
    python benchmarks/train_memory.py --compare loss --micro-batch 8 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> None:
    """One process of the launched group: train a few steps, append its peaks to args.report."""
    import numpy as np
    import torch

    from llmpipe.config.compose import compose
    from llmpipe.config.params import StageParams
    from llmpipe.model.transformer import Transformer, count_parameters
    from llmpipe.runner import distributed
    from llmpipe.tracking.stage_run import StageRun
    from llmpipe.train.batches import RandomWindows
    from llmpipe.train.loop import train
    from llmpipe.train.settings import TrainingParams, model_config

    process = distributed.start(distributed.ProcessInfo.from_environment("cpu"))
    composed = compose([f"model={args.preset}", f"model.context_length={args.context}"], ROOT / "conf")
    config = model_config(StageParams("benchmark", composed, ["model"]), args.vocab_size)
    torch.manual_seed(0)
    model = Transformer(config)
    parameters = count_parameters(model)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, 200_000).astype(np.uint16)
    sequences = args.processes * args.micro_batch
    batches = RandomWindows(tokens, config.context_length, sequences, args.micro_batch, 0)
    settings = TrainingParams(max_steps=args.steps, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=1,
                              weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_every=args.steps,
                              checkpoint_every=0, log_every=args.steps, parallelism=args.parallelism, precision="fp32")
    peaks = {}

    def measure_training_peak(_model) -> dict[str, float]:  # called once, after the last step
        peaks["training"] = peak_mib()
        return {}

    result = train(model, settings, batches, measure_training_peak, process,
                   StageRun("benchmark", {}, {}, enabled=False), None)
    peaks["with output"] = peak_mib()
    with open(args.report, "a", encoding="utf-8") as report:
        report.write(json.dumps({"parallelism": args.parallelism, "rank": process.rank, "parameters": parameters,
                                 "train_loss": result.history["train"][-1]["train_loss"], **peaks}) + "\n")
    distributed.barrier()
    distributed.stop()


LOSS_VARIANTS = ("chunked", "full logits", "transformers")


def loss_worker(args) -> None:
    """One variant of `--compare loss` in this process: train, append its peak RSS and tokens/s to args.report."""
    import torch

    from llmpipe.config.compose import compose
    from llmpipe.config.params import StageParams
    from llmpipe.hf.config import hf_llama_config
    from llmpipe.model.transformer import Transformer, count_parameters
    from llmpipe.train.settings import model_config

    overrides = [f"model={args.preset}", f"model.context_length={args.context}"]
    overrides += [f"model.{key}={value}" for key, value in (
        ("n_layer", args.layers), ("d_model", args.d_model), ("n_head", args.heads), ("n_kv_head", args.kv_heads),
        ("ffn_hidden", args.ffn_hidden)) if value is not None]
    config = model_config(StageParams("benchmark", compose(overrides, ROOT / "conf"), ["model"]), args.vocab_size)
    torch.manual_seed(0)
    if args.loss_variant == "transformers":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config = {k: v for k, v in hf_llama_config(config).items()
                     if k not in ("architectures", "model_type", "torch_dtype")}
        model = LlamaForCausalLM(LlamaConfig(**hf_config))
    else:
        model = Transformer(config)
        model.full_logits_loss = args.loss_variant == "full logits"
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, config.context_length + 1),
                           generator=torch.Generator().manual_seed(0))
    losses = []

    def step() -> None:
        with autocast:
            if args.loss_variant == "transformers":  # shifts the labels itself; no KV cache in training
                loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1], use_cache=False).loss
            else:
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    step()  # warm-up: AdamW's state exists from here on
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    with open(args.report, "a", encoding="utf-8") as report:
        report.write(json.dumps({"variant": args.loss_variant, "parameters": count_parameters(model),
                                 "vocab_size": config.vocab_size, "d_model": config.d_model,
                                 "n_layer": config.n_layer, "peak": peak_mib(), "first_loss": losses[0],
                                 "tokens_per_second": args.micro_batch * config.context_length * args.steps / seconds})
                     + "\n")


def compare_losses(args) -> None:
    """Run every loss variant `args.rounds` times, alternating, each in its own process; print the table."""
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        report = Path(temp) / "loss.jsonl"
        for _ in range(args.rounds):
            for variant in LOSS_VARIANTS:
                command = [sys.executable, __file__, *sys.argv[1:], "--loss-variant", variant, "--report", str(report)]
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                if args.malloc_mmap_threshold:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
                subprocess.run(command, cwd=ROOT, check=True, env=env)
        rows = [json.loads(line) for line in report.read_text().splitlines()]
    best = {variant: {"peak": max(r["peak"] for r in rows if r["variant"] == variant),
                      "tokens_per_second": max(r["tokens_per_second"] for r in rows if r["variant"] == variant),
                      "first_loss": next(r["first_loss"] for r in rows if r["variant"] == variant)}
            for variant in LOSS_VARIANTS}
    first = rows[0]
    print(f"\npreset {args.preset} cut to {first['n_layer']} layers × {first['d_model']} "
          f"({first['parameters']:,} parameters, vocabulary {first['vocab_size']:,}), batch {args.micro_batch} × "
          f"{args.context} tokens, {args.precision} on CPU, {args.steps} measured steps after 1 warm-up, best of "
          f"{args.rounds} rounds; MALLOC_MMAP_THRESHOLD_ {args.malloc_mmap_threshold or 'glibc default'}")
    reference = best["full logits"]
    print("| variant | peak RSS MiB | vs full logits | tokens/s | vs full logits | first loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, row in best.items():
        print(f"| {variant} | {row['peak']:,.0f} | {row['peak'] / reference['peak']:.2f} | "
              f"{row['tokens_per_second']:,.0f} | {row['tokens_per_second'] / reference['tokens_per_second']:.2f} | "
              f"{row['first_loss']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", choices=["parallelism", "loss"], default="parallelism")
    parser.add_argument("--preset", help="conf/model preset (default: medium; llama3_8b with --compare loss)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="for presets whose vocab_size is null (default 1024)")
    parser.add_argument("--context", type=int, default=None,
                        help="model.context_length (default 128; 512 with --compare loss)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per process per step (default 1; 4 with --compare loss)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ of the workers, bytes (0: glibc's default, dynamic)")
    loss = parser.add_argument_group("--compare loss: the preset's shape cut down (null: the preset's own)")
    loss.add_argument("--layers", type=int, default=None, help="model.n_layer (default 2)")
    loss.add_argument("--d-model", type=int, default=None, help="model.d_model (default 256)")
    loss.add_argument("--heads", type=int, default=None, help="model.n_head (default 4)")
    loss.add_argument("--kv-heads", type=int, default=None, help="model.n_kv_head (default 2)")
    loss.add_argument("--ffn-hidden", type=int, default=None, help="model.ffn_hidden (default 768)")
    loss.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="autocast bf16, or fp32")
    loss.add_argument("--rounds", type=int, default=2, help="variants alternate this many times")
    parser.add_argument("--parallelism", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--loss-variant", choices=LOSS_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = ({"preset": "llama3_8b", "context": 512, "micro_batch": 4, "layers": 2, "d_model": 256, "heads": 4,
                 "kv_heads": 2, "ffn_hidden": 768} if args.compare == "loss"
                else {"preset": "medium", "context": 128, "micro_batch": 1, "vocab_size": 1024})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.loss_variant:
        return loss_worker(args)
    if args.report:
        return worker(args)
    if args.compare == "loss":
        return compare_losses(args)

    rows = []
    with tempfile.TemporaryDirectory() as temp:
        for parallelism in ("ddp", "fsdp"):
            report = Path(temp) / f"{parallelism}.jsonl"
            command = [sys.executable, "-m", "llmpipe.runner.launch", "--processes", str(args.processes),
                       __file__, "--preset", args.preset, "--vocab-size", str(args.vocab_size),
                       "--context", str(args.context), "--micro-batch", str(args.micro_batch),
                       "--steps", str(args.steps), "--processes", str(args.processes),
                       "--parallelism", parallelism, "--report", str(report)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            if args.malloc_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            subprocess.run(command, cwd=ROOT, check=True, env=env)
            rows += [json.loads(line) for line in report.read_text().splitlines()]
    by = {(row["parallelism"], row["rank"]): row for row in rows}
    print(f"\npreset {args.preset} ({rows[0]['parameters']:,} parameters), context {args.context}, "
          f"{args.processes} processes on CPU (gloo), {args.steps} steps, MALLOC_MMAP_THRESHOLD_ "
          f"{args.malloc_mmap_threshold or 'glibc default'}; peak RSS per process, MiB")
    print("| rank | phase | DDP | FSDP | FSDP / DDP |")
    print("|---|---|---|---|---|")
    for rank in range(args.processes):
        for phase in ("training", "with output"):
            ddp, fsdp = by[("ddp", rank)][phase], by[("fsdp", rank)][phase]
            print(f"| {rank} | {phase} | {ddp:,.0f} | {fsdp:,.0f} | {fsdp / ddp:.2f} |")
    print(f"last train_loss: DDP {by[('ddp', 0)]['train_loss']:.6f}, FSDP {by[('fsdp', 0)]['train_loss']:.6f}")


if __name__ == "__main__":
    main()
