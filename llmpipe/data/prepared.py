"""The prepare stage's output: one directory of `datasets`-readable JSONL files.

    data/prepared/
      pretrain_train.jsonl        {"text": ...}        pretraining documents
      pretrain_validation.jsonl   {"text": ...}        validation text (bits per byte, perplexity)
      finetune_train.jsonl        {"messages": [...]}  fine-tuning examples (internal chat form)
      finetune_validation.jsonl   {"messages": [...]}
      qa_finetuned_people.jsonl   {"question", "answer", "person", "attribute", "split"}  QA of fine-tuned people
      qa_validation_people.jsonl  ...                  QA that selects the best fine-tuning step
      qa_heldout_people.jsonl     ...                  QA of people never seen in fine-tuning
      summary.json                counts of everything above
      world.json                  the fictional people (embedded source only)

The pretraining text streams through: a bundle's `pretrain` is an iterable of (split, document) pairs,
written line by line, so a user corpus larger than memory never is a list (`split_documents` assigns
each document as it comes).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Iterable, Iterator

from llmpipe import atomic
from llmpipe.atomic import json_text
from llmpipe.config import layout
from llmpipe.data.chat_examples import qa_to_messages, read_chat_examples
from llmpipe.data.jsonl import iterate_rows, row_line, write_rows
from llmpipe.errors import InputDataError


def read_pretrain_text(path: str | Path) -> Iterator[str]:
    """The documents of a pretraining text file prepare wrote (layout.PRETRAIN_TEXT[split]), streamed."""
    return (row["text"] for row in iterate_rows(path, string_field="text"))


def split_off(items: list, fraction: float, seed: int, label: str) -> tuple[list, list]:
    """Deterministically split `items` into (train, validation); validation gets at least one item
    when there are two or more."""
    order = list(range(len(items)))
    random.Random(f"{label}-{seed}").shuffle(order)
    n_validation = min(len(items) - 1, max(1, round(len(items) * fraction))) if len(items) > 1 else 0
    chosen = set(order[:n_validation])
    train = [item for i, item in enumerate(items) if i not in chosen]
    validation = [item for i, item in enumerate(items) if i in chosen]
    return train, validation


def split_documents(documents: Iterable[str], fraction: float, seed: int) -> Iterator[tuple[str, str]]:
    """(split, document) pairs in one pass with constant memory: each document is validation text with
    probability `fraction`, drawn from a generator seeded by `seed`, so the choice is deterministic and
    needs no count of the corpus. Both splits get at least one document: the last one (held back one
    step) goes to a split that is still empty."""
    rng = random.Random(f"documents-{seed}")
    counts = {"train": 0, "validation": 0}
    previous = None
    for document in documents:
        if previous is not None:
            split = "validation" if rng.random() < fraction else "train"
            counts[split] += 1
            yield split, previous
        previous = document
    total = sum(counts.values()) + (previous is not None)
    if total < 2:
        raise InputDataError(f"the corpus has {total} document; at least 2 are needed, one of them held out "
                             "as validation text (data.validation_fraction): split it (data.txt_sample_by) or add text")
    empty = [split for split, count in counts.items() if count == 0]
    yield (empty[0] if empty else "validation" if rng.random() < fraction else "train"), previous


def world_bundle(world: dict) -> dict:
    """The embedded world → the files of the prepared directory."""
    qa = world["qa"]
    return {
        "pretrain": [*(("train", d) for d in world["pretrain_train"]),
                     *(("validation", d) for d in world["pretrain_validation"])],
        "finetune_train": [qa_to_messages(p["question"], p["answer"]) for p in qa["finetuned_people"]],
        "finetune_validation": [qa_to_messages(p["question"], p["answer"]) for p in qa["validation_people"]],
        "qa": qa,
        "world": world["people"],
    }


def user_bundle(documents: Iterable[str], validation_fraction: float, seed: int,
                finetune_train: str | None, finetune_validation: str | None,
                finetune_validation_fraction: float) -> dict:
    """The user's documents (a stream) and optional fine-tuning JSONL → the files of the prepared directory.

    The documents are split as they are written (`split_documents`). Without a separate validation JSONL,
    a fraction of the fine-tuning file is held out. QA files are derived from the fine-tuning examples
    (question = last user turn, answer = last assistant turn); there are no held-out people outside the
    embedded world.
    """
    ft_train, ft_validation = [], []
    if finetune_train:
        ft_train = read_chat_examples(finetune_train)
        if finetune_validation:
            ft_validation = read_chat_examples(finetune_validation)
        else:
            ft_train, ft_validation = split_off(ft_train, finetune_validation_fraction, seed, "finetune")

    def as_qa(examples: list[dict], split: str) -> list[dict]:
        return [{"question": next(m["content"] for m in reversed(e["messages"]) if m["role"] == "user"),
                 "answer": e["messages"][-1]["content"], "person": "", "attribute": "answer", "split": split}
                for e in examples]

    return {
        "pretrain": split_documents(documents, validation_fraction, seed),
        "finetune_train": ft_train,
        "finetune_validation": ft_validation,
        "qa": {"finetuned_people": as_qa(ft_train, "finetuned_people"),
               "validation_people": as_qa(ft_validation, "validation_people"), "heldout_people": []},
        "world": None,
    }


def write_pretrain_text(pairs: Iterable[tuple[str, str]], directory: Path) -> dict[str, int]:
    """Write each (split, document) pair as a line of its split's JSONL file; returns the counts."""
    counts = {f"pretrain_{split}_documents": 0 for split in layout.TEXT_SPLITS} | {"pretrain_train_characters": 0}
    with contextlib.ExitStack() as stack:
        handles = {split: stack.enter_context(open(directory / layout.PRETRAIN_TEXT[split].name, "w", encoding="utf-8"))
                   for split in layout.TEXT_SPLITS}
        for split, document in pairs:
            handles[split].write(row_line({"text": document}))
            counts[f"pretrain_{split}_documents"] += 1
            if split == "train":
                counts["pretrain_train_characters"] += len(document)
    return counts


def write_prepared(bundle: dict, output_dir: str | Path = layout.PREPARED) -> dict:
    """Write the bundle atomically as the prepared directory (names from llmpipe.config.layout);
    returns the summary counts."""
    with atomic.atomic_path(output_dir, directory=True) as temp:
        summary = {
            **write_pretrain_text(bundle["pretrain"], temp),
            "finetune_train_examples": len(bundle["finetune_train"]),
            "finetune_validation_examples": len(bundle["finetune_validation"]),
            **{f"qa_{split}_pairs": len(pairs) for split, pairs in bundle["qa"].items()},
        }
        for split in layout.TEXT_SPLITS:
            write_rows(temp / layout.FINETUNE_EXAMPLES[split].name, bundle[f"finetune_{split}"])
        for split in layout.QA_SPLITS:
            write_rows(temp / layout.QA_FILES[split].name, bundle["qa"][split])
        if bundle["world"] is not None:
            (temp / layout.WORLD.name).write_text(json_text(bundle["world"], indent=1, sort_keys=False),
                                                  encoding="utf-8")
        (temp / layout.PREPARED_SUMMARY.name).write_text(json_text(summary), encoding="utf-8")
    return summary
