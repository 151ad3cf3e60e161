"""Peak memory per process of data-parallel training: DDP against FSDP2 (`pretrain.parallelism`).

For each parallelism, launches N processes (llmpipe.runner.launch: torch's elastic launcher, gloo on
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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="medium", help="conf/model preset")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--context", type=int, default=128, help="model.context_length (activations stay small)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per process per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ of the workers, bytes (0: glibc's default, dynamic)")
    parser.add_argument("--parallelism", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        return worker(args)

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
