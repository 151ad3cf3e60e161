"""Training batches: what the loop asks for, and the two sources that answer.

The loop asks a `BatchSource` for the *global* batch of optimizer step N, as micro-batches of (input
ids, target ids); each process takes its share. A global batch is a pure function of the step, so a
resumed run sees exactly the data it would have seen, and DDP processes split the same batch.
- `RandomWindows` (pretraining): sequences at random offsets of the token array, drawn from a
  generator seeded by (seed, step).
- `EpochBatches` (fine-tuning): chat examples in epochs; every epoch is a fresh permutation seeded by
  (seed, epoch), step N takes the next global batch of examples, padded per micro-batch.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from llmpipe.errors import InputDataError

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (input ids, target ids) of shape (sequences, length)


class BatchSource(Protocol):
    def global_batch(self, step: int) -> list[MicroBatch]:
        """All micro-batches of optimizer step `step`, for all processes together."""


class RandomWindows:
    def __init__(self, tokens: np.ndarray, context_length: int, global_sequences: int, micro_sequences: int,
                 seed: int):
        if len(tokens) < context_length + 2:
            raise InputDataError(f"the training split has {len(tokens)} tokens; model.context_length "
                                 f"{context_length} needs at least {context_length + 2}")
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
