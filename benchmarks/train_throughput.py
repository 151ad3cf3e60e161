"""Training throughput of our transformer against Hugging Face transformers' LlamaForCausalLM.

Same shapes, same weights, same batch, same precision, same fused AdamW, measured in the same run
(rounds alternate between the two so background load hits both alike), plus this device's measured
matmul FLOP/s as the ceiling for model FLOPs utilization. Prints, per preset, tokens per second, MFU,
the ratio llmpipe / transformers and (on CUDA) each model's peak GPU memory. `--compile` compiles each
transformer block of both models (regional compilation: one compiled block serves every layer).

    python benchmarks/train_throughput.py                      # CPU, the tiny preset's shape
    python benchmarks/train_throughput.py --preset small --batch 8
    python benchmarks/train_throughput.py --device cuda --precision bf16 --compile \\
        --preset small medium large tinyllama_1b --tokens-per-step 16384

A preset that fails (out of memory, say) prints one line and the next one runs. Needs the dev extra
(transformers).
"""

from __future__ import annotations

import argparse
import time

import torch

from llmpipe.config.compose import compose
from llmpipe.config.params import StageParams
from llmpipe.hf.export import hf_model
from llmpipe.model.transformer import Transformer, compile_blocks, count_parameters
from llmpipe.train.flops import (
    measure_matmul_flops_per_second,
    training_flops_per_token,
)
from llmpipe.train.settings import model_config


def training_step_seconds(model, tokens, optimizer, autocast, hf: bool) -> float:
    start = time.perf_counter()
    with autocast:
        if hf:
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1], use_cache=False).loss  # no KV cache in training
        else:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a model keeps between steps: its parameters and its optimizer state."""
    tensors = {id(p): p for p in model.parameters()}
    for state in optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if torch.is_tensor(t)})
    return sum(t.numel() * t.element_size() for t in tensors.values() if t.device.type != "cpu")


def measure_preset(preset: str, args, device: torch.device, peak: float) -> None:
    composed = compose([f"model={preset}"])
    config = model_config(StageParams("benchmark", composed, ["model"]), None if preset_fixes_vocab(composed)
                          else args.vocab_size)
    batch = args.batch or max(1, args.tokens_per_step // config.context_length)
    torch.manual_seed(0)
    ours = Transformer(config).to(device)
    theirs = hf_model(ours).to(device)
    theirs.train()
    models = {"llmpipe": ours, "transformers": theirs}
    if args.compile:
        torch._dynamo.reset()  # each preset compiles afresh (no shape-generalized graphs from the last one)
        compile_blocks(ours)
        compile_blocks(theirs.model)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda")
                  for name, m in models.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    tokens = torch.randint(0, config.vocab_size, (batch, config.context_length + 1), device=device)
    flops_per_token = training_flops_per_token(config, count_parameters(ours))

    compile_seconds = {}
    for name, model in models.items():  # warm up (and compile)
        start = time.perf_counter()
        for _ in range(3):
            training_step_seconds(model, tokens, optimizers[name], autocast, name == "transformers")
        compile_seconds[name] = time.perf_counter() - start
    seconds = {name: 0.0 for name in models}
    own_peak = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds[name] += sum(training_step_seconds(model, tokens, optimizers[name], autocast, name == "transformers")
                                 for _ in range(args.steps))
            if device.type == "cuda":
                other = "transformers" if name == "llmpipe" else "llmpipe"
                own = torch.cuda.max_memory_allocated(device) - resident_bytes(models[other], optimizers[other])
                own_peak[name] = max(own_peak.get(name, 0), own)
    tokens_per_step = batch * config.context_length
    print(f"{preset}: {count_parameters(ours):,} parameters, batch {batch} × {config.context_length} tokens, "
          f"vocabulary {config.vocab_size:,}, {args.precision}{' compiled' if args.compile else ''} on {device}; "
          f"measured matmul ceiling {peak / 1e12:.2f} TFLOP/s", flush=True)
    rates = {}
    for name in models:
        rates[name] = tokens_per_step * args.steps * args.rounds / seconds[name]
        memory = f"   peak memory {own_peak[name] / 2**30:6.2f} GiB" if name in own_peak else ""
        print(f"  {name:<13} {rates[name]:>12,.0f} tokens/s   MFU {flops_per_token * rates[name] / peak:6.1%}"
              f"   warm-up{' + compile' if args.compile else ''} {compile_seconds[name]:5.1f} s{memory}", flush=True)
    print(f"  ratio llmpipe / transformers: {rates['llmpipe'] / rates['transformers']:.2f}×", flush=True)


def preset_fixes_vocab(composed: dict) -> bool:
    """A published model's shape (e.g. tinyllama_1b) carries its own vocabulary size."""
    return composed.get("model", {}).get("vocab_size") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["tiny"], help="conf/model presets, measured in turn")
    parser.add_argument("--vocab-size", type=int, default=1024, help="for presets whose vocab_size is null")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: --tokens-per-step)")
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="tokens per step when --batch is not set")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = measure_matmul_flops_per_second(device, dtype, size=2048 if device.type == "cpu" else 8192)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"{args.precision} matmul ceiling {peak / 1e12:.1f} TFLOP/s", flush=True)
    for preset in args.preset:
        try:
            measure_preset(preset, args, device, peak)
        except Exception as exc:  # one preset's failure (e.g. out of memory) does not end the others
            print(f"{preset}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
