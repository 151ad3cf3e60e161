"""Question answering accuracy: greedy answers in the chat format, exact match, overall and per attribute.

Questions are answered through the generation engine (its key/value cache) in batches of prompts of equal
token length; each answer ends at the end-of-turn token or after `max_new_tokens`. A measurement that runs
longer than 30 s prints a progress line at least every 30 s, labelled with `label` (the stage, the variant).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from llmpipe.model.generation import Engine, SamplingSettings, prompt_limit
from llmpipe.model.transformer import IGNORE_INDEX, Transformer
from llmpipe.runner.heartbeat import Heartbeat
from llmpipe.text.chat_template import ChatTemplate, EncodedExample, pad_batch


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def qa_accuracy(model: Transformer, template: ChatTemplate, pairs: list[dict], max_new_tokens: int,
                name: str, label: str = "", padded: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Exact-match accuracy over `pairs` ({question, answer, attribute}), overall and per attribute.

    Returns metrics `{name}` and `{name}_{attribute}`, and every (question, expected, answer, correct).
    Questions too long for the context keep their end (llmpipe.model.generation.fit_prompt) and are counted in
    `{name}_questions_cut_to_fit` (present only when there are some).
    """
    if not pairs:
        return {}, []
    prompts = [template.encode_prompt([{"role": "user", "content": p["question"]}]) for p in pairs]
    engine = Engine(model, stop_ids={template.end_of_turn})
    with Heartbeat(f"{label}{name}:", len(prompts), "questions") as beat:
        generated = engine.generate(prompts, SamplingSettings(max_new_tokens=max_new_tokens), on_batch=beat.tick,
                                    padded=padded)
    answers = [template.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    metrics, results = score_answers(pairs, answers, name)
    too_long = sum(len(p) > prompt_limit(model.config.context_length, max_new_tokens) for p in prompts)
    if too_long:
        metrics[f"{name}_questions_cut_to_fit"] = too_long
    return metrics, results


def score_answers(pairs: list[dict], answers: list[str], name: str) -> tuple[dict[str, float], list[dict]]:
    """Exact match of each answer against its pair's: metrics `{name}` and, when the pairs have more than one
    attribute, `{name}_{attribute}`; and every (question, expected, answer, correct). No pairs: nothing."""
    if not pairs:
        return {}, []
    results, by_attribute = [], defaultdict(list)
    for pair, answer in zip(pairs, answers, strict=True):
        correct = normalize_answer(answer) == normalize_answer(pair["answer"])
        results.append({"question": pair["question"], "expected": pair["answer"], "answer": answer, "correct": correct})
        by_attribute[pair.get("attribute") or "answer"].append(correct)
    metrics = {name: sum(r["correct"] for r in results) / len(results)}
    if len(by_attribute) > 1:
        for attribute, marks in sorted(by_attribute.items()):
            metrics[f"{name}_{attribute}"] = sum(marks) / len(marks)
    return metrics, results


def qa_metrics(model: Transformer, template: ChatTemplate, qa_sets: dict[str, list[dict]], max_new_tokens: int,
               prefix: str = "", label: str = "", padded: bool = False) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """`qa_accuracy` of every QA split: metrics `{prefix}qa_accuracy_{split}[_{attribute}]`, answers by split
    (`padded`: prompts of all lengths in one batch, llmpipe.model.generation)."""
    metrics, answers = {}, {}
    for split, pairs in qa_sets.items():
        split_metrics, results = qa_accuracy(model, template, pairs, max_new_tokens, f"{prefix}qa_accuracy_{split}",
                                             label, padded)
        answers[split] = [{**result, "split": split} for result in results]
        metrics.update(split_metrics)
    return metrics, answers


def namesake_answers(results: list[dict], pairs: list[dict], people: list[dict]) -> dict[str, int]:
    """Where the wrong answers come from: of the `results` (qa_accuracy's, for `pairs`) that are wrong, how many
    give the asked attribute of another person with the same last name, of one with the same first name, of
    anyone else in `people` (world.json's rows), or of no one. Many namesake answers mean the model keyed
    facts on part of the name."""
    owners: dict[tuple[str, str], list[str]] = {}
    for person in people:
        for attribute, value in person.items():
            owners.setdefault((attribute, normalize_answer(value)), []).append(person["name"])
    counts = {"wrong": 0, "same_last_name": 0, "same_first_name": 0, "someone_else": 0, "no_one": 0}
    for pair, result in zip(pairs, results):
        if result["correct"]:
            continue
        counts["wrong"] += 1
        first, last = pair["person"].split()[0], pair["person"].split()[-1]
        others = [name for name in owners.get((pair["attribute"], normalize_answer(result["answer"])), [])
                  if name != pair["person"]]
        if any(name.split()[-1] == last for name in others):
            counts["same_last_name"] += 1
        elif any(name.split()[0] == first for name in others):
            counts["same_first_name"] += 1
        else:
            counts["someone_else" if others else "no_one"] += 1
    return counts


@torch.no_grad()
def answer_loss(model: Transformer, examples: list[EncodedExample], pad_id: int, batch_size: int,
                label: str = "") -> float:
    """Mean loss per answer token over `examples` (the fine-tuning validation loss)."""
    device = model.embed_tokens.weight.device
    total, count = 0.0, 0
    with Heartbeat(f"{label}validation answer loss:", len(examples), "examples") as beat:
        for start in range(0, len(examples), batch_size):
            ids, labels = pad_batch(examples[start:start + batch_size], pad_id)
            _, loss = model(ids.to(device), labels.to(device), loss_reduction="sum")
            total += float(loss)
            count += int((labels != IGNORE_INDEX).sum())
            beat.tick(min(start + batch_size, len(examples)))
    return total / max(count, 1)
