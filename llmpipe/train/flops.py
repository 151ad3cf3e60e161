"""Model FLOPs utilization (MFU): the FLOPs a training step needs, against what the device can do.

- `training_flops_per_token`: forward + backward FLOPs per token of a model config (PaLM appendix B);
- `measure_matmul_flops_per_second`: this device's achieved FLOP/s on a square matmul, the practical
  ceiling on a CPU (`pretrain.peak_flops_per_second: null` measures it at start; set it to a GPU's
  datasheet peak instead).
"""

from __future__ import annotations

import time

import torch

from llmpipe.model.transformer import ModelConfig


def training_flops_per_token(config: ModelConfig, parameters: int) -> float:
    """6 × parameters (without the input embedding lookup) plus attention scores and mixing,
    12 × layers × heads × head_dim × context."""
    non_embedding = parameters - (0 if config.tie_embeddings else config.vocab_size * config.d_model)
    attention = 12 * config.n_layer * config.n_head * config.head_dim * config.context_length
    return 6 * non_embedding + attention


def measure_matmul_flops_per_second(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                                    trials: int = 7) -> float:
    """The best achieved FLOP/s over `trials` timed square matmuls (random inputs from a private generator,
    so the global random state that seeds the model is left alone). The best trial, not the mean: a
    ceiling measured during a moment of interference would let the utilization exceed 1."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    repeats = 10 if device.type == "cuda" else 1  # a GPU matmul takes about a millisecond: time ten
    for _ in range(3):  # warm up (on a GPU, also the clocks)
        a @ b
    best = float("inf")
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size ** 3 / best
