"""Language-model batches and measurements over flat token arrays.

- `RandomWindows`: each optimizer step draws its sequences at random offsets of the token array, from
  a generator seeded by (seed, step): the data of step N never depends on what ran before, which makes
  resume exact and lets DDP processes split the same global batch.
- `language_model_loss`: mean next-token loss over the validation tokens in non-overlapping windows.
- `bits_per_byte`: loss converted to bits per UTF-8 byte of the original text (tokenizer-independent).
- `unigram_bits_per_byte`: the baseline of a model that knows only token frequencies.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from llmpipe.errors import InputDataError, ParamError
from llmpipe.training import MicroBatch


class RandomWindows:
    def __init__(self, tokens: np.ndarray, context_length: int, global_sequences: int, micro_sequences: int,
                 seed: int):
        if len(tokens) < context_length + 2:
            raise InputDataError(f"the training split has {len(tokens)} tokens; model.context_length "
                                 f"{context_length} needs at least {context_length + 2}")
        if global_sequences % micro_sequences:
            raise ParamError(f"params.yaml: pretrain.global_batch_sequences ({global_sequences}) must be a multiple "
                             f"of pretrain.micro_batch_sequences ({micro_sequences})")
        self.tokens = tokens
        self.context_length = context_length
        self.global_sequences = global_sequences
        self.micro_sequences = micro_sequences
        self.seed = seed

    def global_batch(self, step: int) -> list[MicroBatch]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.context_length - 1, size=self.global_sequences)
        windows = torch.from_numpy(np.stack([self.tokens[s:s + self.context_length + 1] for s in starts]).astype(np.int64))
        return [(windows[i:i + self.micro_sequences, :-1], windows[i:i + self.micro_sequences, 1:])
                for i in range(0, self.global_sequences, self.micro_sequences)]


@torch.no_grad()
def language_model_loss(model, tokens: np.ndarray, context_length: int, max_tokens: int | None,
                        batch_size: int, device) -> tuple[float, int]:
    """(mean loss in nats per predicted token, number of predicted tokens) over the first `max_tokens`."""
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    data = torch.from_numpy(np.asarray(tokens).astype(np.int64))
    windows = [data[start:start + context_length + 1] for start in range(0, len(data) - 1, context_length)]
    total, count = 0.0, 0
    for length in sorted({len(w) for w in windows}):  # the last window may be shorter
        same = [w for w in windows if len(w) == length]
        for i in range(0, len(same), batch_size):
            batch = torch.stack(same[i:i + batch_size]).to(device)
            _, loss = model(batch[:, :-1], batch[:, 1:], loss_reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    return total / max(count, 1), count


def bits_per_byte(mean_loss: float, predicted_tokens: int, split_tokens: int, split_bytes: int) -> float:
    """Nats per token → bits per UTF-8 byte, scaling the byte count when only part of the split was used."""
    covered_bytes = split_bytes * predicted_tokens / max(split_tokens - 1, 1)
    return mean_loss * predicted_tokens / (math.log(2) * covered_bytes)


def unigram_bits_per_byte(train_tokens: np.ndarray, validation_tokens: np.ndarray, vocab_size: int,
                          validation_bytes: int) -> float:
    """Bits per byte of the add-one-smoothed unigram distribution of the training tokens."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    log_probabilities = np.log(counts / counts.sum())
    nats = -log_probabilities[np.asarray(validation_tokens[1:])].sum()
    return float(nats / (math.log(2) * validation_bytes))


def measure_matmul_flops_per_second(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                                    repeats: int = 5) -> float:
    """This device's achieved FLOP/s on a square matmul: the practical ceiling for MFU on CPU."""
    import time

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)
