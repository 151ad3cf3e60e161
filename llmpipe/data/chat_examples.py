"""Fine-tuning examples: read the common JSONL formats and normalize them to one internal form.

Accepted, one JSON object per line (formats may not be mixed within a line):
- chat:               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
- Alpaca:             {"instruction": "...", "input": "...", "output": "..."}   ("input" optional)
- prompt/completion:  {"prompt": "...", "completion": "..."}

Internal form: {"messages": [...]} with roles system/user/assistant, at least one user turn, and a
non-empty assistant turn last. Errors name the file and line: `data/ft.jsonl:7: ...`.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmpipe.data.jsonl import read_records
from llmpipe.errors import InputDataError

ROLES = ("system", "user", "assistant")


def qa_to_messages(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def normalize_example(record: object, where: str) -> dict:
    """One parsed JSON value → internal form; `where` ("file:line") prefixes every error."""
    if not isinstance(record, dict):
        raise InputDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    formats = [name for name, keys in (("messages", {"messages"}), ("Alpaca", {"instruction", "output"}),
                                       ("prompt/completion", {"prompt", "completion"})) if keys & set(record)]
    if len(formats) > 1:
        raise InputDataError(f"{where}: mixes the {' and '.join(formats)} formats; use one per line")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        normalized = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InputDataError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise InputDataError(f"{where}: messages[{index}].role is {role!r}; expected one of "
                                     + ", ".join(ROLES))
            if not isinstance(content, str):
                raise InputDataError(f"{where}: messages[{index}].content must be a string")
            normalized.append({"role": role, "content": content})
        if not any(m["role"] == "user" for m in normalized):
            raise InputDataError(f"{where}: 'messages' has no user turn")
        if normalized[-1]["role"] != "assistant":
            raise InputDataError(f"{where}: the last message must be the assistant's answer")
    elif "instruction" in record or "output" in record:
        instruction, extra, output = record.get("instruction"), record.get("input", ""), record.get("output")
        for key, value in (("instruction", instruction), ("output", output), ("input", extra)):
            if not isinstance(value, str):
                raise InputDataError(f"{where}: Alpaca field '{key}' must be a string")
        prompt = instruction + (f"\n\n{extra}" if extra.strip() else "")
        normalized = qa_to_messages(prompt, output)["messages"]
    elif "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise InputDataError(f"{where}: 'prompt' and 'completion' must both be strings")
        normalized = qa_to_messages(prompt, completion)["messages"]
    else:
        raise InputDataError(f"{where}: expected 'messages', Alpaca 'instruction'/'output', or "
                             f"'prompt'/'completion' fields; found {sorted(record)}")
    if not normalized[-1]["content"].strip():
        raise InputDataError(f"{where}: the answer (last assistant turn) is empty")
    if not any(m["content"].strip() for m in normalized if m["role"] == "user"):
        raise InputDataError(f"{where}: the question (user turn) is empty")
    return {"messages": normalized}


def read_prepared_examples(path: str | Path) -> list[dict]:
    """The prepare stage's fine-tuning examples, checked again line by line (they are files anyone can edit)."""
    if not Path(path).is_file():
        raise InputDataError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    return [normalize_example(record, where) for where, record in read_records(path)]


def read_chat_examples(path: str | Path) -> list[dict]:
    """Read and normalize a fine-tuning JSONL file; an empty file is an error."""
    examples = [normalize_example(record, where) for where, record in read_records(path)]
    if not examples:
        raise InputDataError(f"{path}: no examples (the file is empty)")
    return examples


def example_statistics(examples: list[dict]) -> dict[str, int]:
    """Counts a user should know about their data: duplicates and examples with nothing to learn."""
    keys = [json.dumps(e["messages"], sort_keys=True) for e in examples]
    empty = sum(1 for e in examples if not e["messages"][-1]["content"].strip())
    return {"examples": len(examples), "duplicate_examples": len(keys) - len(set(keys)), "empty_examples": empty}
