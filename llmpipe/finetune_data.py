"""Fine-tuning examples as training batches: chat-encoded, padded, with loss masks.

Examples come from the prepare stage (already validated and normalized). Each is encoded with the
chat template (llmpipe.chat_template): labels only on the answers. A micro-batch pads its examples on
the right to the longest one, with IGNORE_INDEX labels on the padding. Right padding needs no attention
mask under causal attention: a real token only attends to earlier positions, never to the padding after
it. Examples longer than the context are truncated and counted.

Batches follow epochs: every epoch is a fresh permutation seeded by (seed, epoch), and step N takes
the next `global_batch` examples, so the data of a step is a pure function of the step (exact resume,
DDP processes split the same global batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llmpipe.chat_template import ChatTemplate, EncodedExample
from llmpipe.errors import InputDataError
from llmpipe.model import IGNORE_INDEX, Transformer
from llmpipe.training import MicroBatch


def read_examples(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputDataError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def example_statistics(examples: list[dict]) -> dict[str, int]:
    """Counts a user should know about their data: duplicates and examples with nothing to learn."""
    keys = [json.dumps(e["messages"], sort_keys=True) for e in examples]
    empty = sum(1 for e in examples if not e["messages"][-1]["content"].strip())
    return {"examples": len(examples), "duplicate_examples": len(keys) - len(set(keys)), "empty_examples": empty}


def encode_examples(template: ChatTemplate, examples: list[dict], max_length: int) -> tuple[list[EncodedExample], int]:
    """Encode for training; returns the examples that still have answer tokens after truncation to
    `max_length`, and how many were truncated (those left without any answer token are dropped)."""
    encoded = [template.encode_example(e["messages"], max_length) for e in examples]
    kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels)]
    return kept, sum(e.truncated for e in encoded)


def pad(examples: list[EncodedExample], pad_id: int) -> MicroBatch:
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example.ids)] = torch.tensor(example.ids)
        labels[row, :len(example.labels)] = torch.tensor(example.labels)
    return ids, labels


class EpochBatches:
    def __init__(self, examples: list[EncodedExample], global_batch: int, micro_batch: int, pad_id: int, seed: int):
        if not examples:
            raise InputDataError("no fine-tuning examples: data/prepared/finetune_train.jsonl is empty "
                                 "(set data.finetune_train for your own data)")
        self.examples = examples
        self.examples_per_step = global_batch
        self.micro_batch = micro_batch
        self.pad_id = pad_id
        self.seed = seed

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def global_batch_indices(self, step: int) -> list[int]:
        start = step * self.examples_per_step
        indices = []
        while len(indices) < self.examples_per_step:
            epoch, offset = divmod(start + len(indices), len(self.examples))
            take = min(self.examples_per_step - len(indices), len(self.examples) - offset)
            indices.extend(self._order(epoch)[offset:offset + take].tolist())
        return indices

    def global_batch(self, step: int) -> list[MicroBatch]:
        chosen = [self.examples[i] for i in self.global_batch_indices(step)]
        return [pad(chosen[i:i + self.micro_batch], self.pad_id) for i in range(0, len(chosen), self.micro_batch)]


@torch.no_grad()
def answer_loss(model: Transformer, examples: list[EncodedExample], pad_id: int, batch_size: int) -> float:
    """Mean loss per answer token over `examples` (the fine-tuning validation loss)."""
    device = model.embed_tokens.weight.device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, labels = pad(examples[start:start + batch_size], pad_id)
        _, loss = model(ids.to(device), labels.to(device), loss_reduction="sum")
        total += float(loss)
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)
