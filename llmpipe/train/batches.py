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

from llmpipe.chat_template import EncodedExample, pad_batch
from llmpipe.pipeline.errors import InputDataError

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


class EpochBatches:
    def __init__(self, examples: list[EncodedExample], global_examples: int, micro_examples: int, pad_id: int,
                 seed: int):
        if not examples:
            raise InputDataError("no fine-tuning examples: data/prepared/finetune_train.jsonl is empty "
                                 "(set data.finetune_train for your own data)")
        self.examples = examples
        self.global_examples = global_examples
        self.micro_examples = micro_examples
        self.pad_id = pad_id
        self.seed = seed

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def global_batch_indices(self, step: int) -> list[int]:
        start = step * self.global_examples
        indices = []
        while len(indices) < self.global_examples:
            epoch, offset = divmod(start + len(indices), len(self.examples))
            take = min(self.global_examples - len(indices), len(self.examples) - offset)
            indices.extend(self._order(epoch)[offset:offset + take].tolist())
        return indices

    def global_batch(self, step: int) -> list[MicroBatch]:
        chosen = [self.examples[i] for i in self.global_batch_indices(step)]
        return [pad_batch(chosen[i:i + self.micro_examples], self.pad_id)
                for i in range(0, len(chosen), self.micro_examples)]
