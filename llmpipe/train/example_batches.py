"""Batches of fine-tuning examples (chat-template encoded, loss on the answers): shuffled epochs, padded."""

from __future__ import annotations

import numpy as np

from llmpipe.errors import InputDataError
from llmpipe.text.chat_template import EncodedExample, pad_batch
from llmpipe.train.batches import MicroBatch


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
