"""The prepare stage's output: one directory of `datasets`-readable JSONL files.

    data/prepared/
      pretrain_train.jsonl        {"text": ...}        pretraining documents
      pretrain_validation.jsonl   {"text": ...}        validation text (bits per byte, perplexity)
      finetune_train.jsonl        {"messages": [...]}  fine-tuning examples (internal chat form)
      finetune_validation.jsonl   {"messages": [...]}
      qa_finetune_people.jsonl    {"question", "answer", "person", "attribute"}  QA of fine-tuned people
      qa_validation_people.jsonl  ...                  QA that selects the best fine-tuning step
      qa_heldout_people.jsonl     ...                  QA of people never seen in fine-tuning
      summary.json                counts of everything above
      world.json                  the fictional people (embedded source only)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llmpipe import atomic
from llmpipe.chat_data import qa_to_messages, read_chat_examples

QA_FILES = {"finetune": "qa_finetune_people.jsonl", "validation": "qa_validation_people.jsonl",
            "heldout": "qa_heldout_people.jsonl"}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


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


def world_bundle(world: dict) -> dict:
    """The embedded world → the files of the prepared directory."""
    qa = world["qa"]
    return {
        "pretrain_train": world["pretrain_train"],
        "pretrain_validation": world["pretrain_validation"],
        "finetune_train": [qa_to_messages(p["question"], p["answer"]) for p in qa["finetune"]],
        "finetune_validation": [qa_to_messages(p["question"], p["answer"]) for p in qa["validation"]],
        "qa": qa,
        "world": world["people"],
    }


def user_bundle(documents: list[str], validation_fraction: float, seed: int,
                finetune_train: str | None, finetune_validation: str | None,
                finetune_validation_fraction: float) -> dict:
    """The user's documents (and optional fine-tuning JSONL) → the files of the prepared directory.

    Without a separate validation JSONL, a fraction of the fine-tuning file is held out. QA files are
    derived from the fine-tuning examples (question = last user turn, answer = last assistant turn);
    there are no held-out people outside the embedded world.
    """
    train_docs, validation_docs = split_off(documents, validation_fraction, seed, "documents")
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
        "pretrain_train": train_docs,
        "pretrain_validation": validation_docs,
        "finetune_train": ft_train,
        "finetune_validation": ft_validation,
        "qa": {"finetune": as_qa(ft_train, "finetune"), "validation": as_qa(ft_validation, "validation"),
               "heldout": []},
        "world": None,
    }


def write_prepared(output_dir: str | Path, bundle: dict) -> dict:
    """Write the bundle atomically as the prepared directory; returns the summary counts."""
    summary = {
        "pretrain_train_documents": len(bundle["pretrain_train"]),
        "pretrain_validation_documents": len(bundle["pretrain_validation"]),
        "pretrain_train_characters": sum(len(d) for d in bundle["pretrain_train"]),
        "finetune_train_examples": len(bundle["finetune_train"]),
        "finetune_validation_examples": len(bundle["finetune_validation"]),
        **{f"qa_{split}_people_pairs": len(pairs) for split, pairs in bundle["qa"].items()},
    }
    with atomic.atomic_path(output_dir, directory=True) as temp:
        _write_jsonl(temp / "pretrain_train.jsonl", [{"text": d} for d in bundle["pretrain_train"]])
        _write_jsonl(temp / "pretrain_validation.jsonl", [{"text": d} for d in bundle["pretrain_validation"]])
        _write_jsonl(temp / "finetune_train.jsonl", bundle["finetune_train"])
        _write_jsonl(temp / "finetune_validation.jsonl", bundle["finetune_validation"])
        for split, name in QA_FILES.items():
            _write_jsonl(temp / name, bundle["qa"][split])
        if bundle["world"] is not None:
            (temp / "world.json").write_text(json.dumps(bundle["world"], indent=1, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        (temp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary
