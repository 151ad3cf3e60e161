"""Training throughput of our transformer against Hugging Face transformers' LlamaForCausalLM.

Same shapes, same weights, same batch, same precision, measured in the same run (rounds alternate
between the two so background load hits both alike), plus this device's measured matmul FLOP/s as the
ceiling for model FLOPs utilization. Prints tokens per second, MFU and the ratios.

    python benchmarks/train_throughput.py                      # CPU, the tiny preset's shape
    python benchmarks/train_throughput.py --preset small --batch 16
    python benchmarks/train_throughput.py --device cuda --precision bf16 --compile --preset medium

Needs the dev extra (transformers).
"""

from __future__ import annotations

import argparse
import time

import torch

from llmpipe.export.hf import hf_model
from llmpipe.model import Transformer, count_parameters
from llmpipe.pipeline.compose import compose
from llmpipe.pipeline.params import StageParams
from llmpipe.train.flops import (
    measure_matmul_flops_per_second,
    training_flops_per_token,
)
from llmpipe.train.settings import model_config


def training_step_seconds(model, tokens, optimizer, autocast, hf: bool) -> float:
    start = time.perf_counter()
    with autocast:
        if hf:
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        else:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="conf/model preset")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    composed = compose([f"model={args.preset}"])
    config = model_config(StageParams("benchmark", composed, ["model"]), args.vocab_size)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = Transformer(config).to(device)
    theirs = hf_model(ours).to(device)
    theirs.train()
    models = {"llmpipe": ours, "transformers": theirs}
    if args.compile:
        models = {name: torch.compile(m) for name, m in models.items()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    tokens = torch.randint(0, config.vocab_size, (args.batch, config.context_length + 1), device=device)

    peak = measure_matmul_flops_per_second(device, torch.bfloat16 if args.precision == "bf16" else torch.float32,
                                           size=2048 if device.type == "cpu" else 8192)
    flops_per_token = training_flops_per_token(config, count_parameters(ours))
    for name, model in models.items():  # warm up (and compile)
        for _ in range(3):
            training_step_seconds(model, tokens, optimizers[name], autocast, name == "transformers")
    seconds = {name: 0.0 for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            seconds[name] += sum(training_step_seconds(model, tokens, optimizers[name], autocast, name == "transformers")
                                 for _ in range(args.steps))
    tokens_per_step = args.batch * config.context_length
    print(f"{count_parameters(ours):,} parameters, batch {args.batch} × {config.context_length} tokens, "
          f"{args.precision}{' compiled' if args.compile else ''} on {device}; measured matmul ceiling "
          f"{peak / 1e9:.1f} GFLOP/s")
    rates = {}
    for name in models:
        rates[name] = tokens_per_step * args.steps * args.rounds / seconds[name]
        print(f"  {name:<13} {rates[name]:>10,.0f} tokens/s   MFU {flops_per_token * rates[name] / peak:6.1%}")
    print(f"  ratio llmpipe / transformers: {rates['llmpipe'] / rates['transformers']:.2f}×")


if __name__ == "__main__":
    main()
