"""Generation speed: our KV cache against full recomputation, and against transformers' `generate`.

Same weights, same prompt, greedy decoding (the three must produce the same tokens, which the script
checks), measured in the same run. Prints tokens per second and ratios.

    python benchmarks/generation.py                     # the tiny preset's shape, random weights
    python benchmarks/generation.py --model models/pretrained --new-tokens 100

Needs the dev extra (transformers).
"""

from __future__ import annotations

import argparse
import time

import torch

from llmpipe.config.compose import compose
from llmpipe.config.params import StageParams
from llmpipe.hf.export import hf_model
from llmpipe.model.generation import Engine, SamplingSettings
from llmpipe.model.transformer import Transformer
from llmpipe.model.weights import load_model
from llmpipe.train.settings import model_config


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model directory (default: random weights of --preset)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.model:
        ours, _ = load_model(args.model)
    else:
        composed = compose([f"model={args.preset}"])
        torch.manual_seed(0)
        ours = Transformer(model_config(StageParams("benchmark", composed, ["model"]), 1024)).eval()
    theirs = hf_model(ours)
    new_tokens = min(args.new_tokens, ours.config.context_length - args.prompt_tokens)
    prompt = torch.randint(0, ours.config.vocab_size, (args.prompt_tokens,)).tolist()
    settings = SamplingSettings(max_new_tokens=new_tokens)

    runs = {
        "llmpipe, KV cache": lambda: list(Engine(ours).stream(prompt, settings)),
        "llmpipe, no cache": lambda: list(Engine(ours, use_cache=False).stream(prompt, settings)),
        "transformers generate": lambda: theirs.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            use_cache=True, pad_token_id=0)[0, len(prompt):].tolist(),
    }
    seconds = {name: 0.0 for name in runs}
    outputs = {}
    with torch.no_grad():
        for name, function in runs.items():
            function()  # warm up
        for _ in range(args.repeats):
            for name, function in runs.items():
                outputs[name], elapsed = timed(function)
                seconds[name] += elapsed
    same = len({tuple(tokens) for tokens in outputs.values()}) == 1
    print(f"greedy, {args.prompt_tokens}-token prompt, {new_tokens} new tokens, {args.repeats} repeats; "
          f"identical tokens from all three: {same}")
    rates = {name: new_tokens * args.repeats / s for name, s in seconds.items()}
    for name, rate in rates.items():
        print(f"  {name:<22} {rate:>8,.0f} tokens/s")
    print(f"  KV cache speed-up over recomputation: {rates['llmpipe, KV cache'] / rates['llmpipe, no cache']:.2f}×")
    print(f"  ratio llmpipe (cache) / transformers generate: {rates['llmpipe, KV cache'] / rates['transformers generate']:.2f}×")


if __name__ == "__main__":
    main()
