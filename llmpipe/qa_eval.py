"""Question answering accuracy: greedy answers in the chat format, exact match, per attribute.

Questions are answered in batches of prompts of equal token length (so no padding is needed and
positions line up); each answer ends at the end-of-turn token or after `max_new_tokens`.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from llmpipe.chat_template import ChatTemplate
from llmpipe.model import Transformer


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


@torch.no_grad()
def greedy_answers(model: Transformer, prompts: list[list[int]], stop_id: int, max_new_tokens: int,
                   batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of each prompt (without the stop token)."""
    device = model.embed_tokens.weight.device
    answers: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    for length, indices in sorted(by_length.items()):
        steps = min(max_new_tokens, model.config.context_length - length)
        for start in range(0, len(indices), batch_size):
            group = indices[start:start + batch_size]
            tokens = torch.tensor([prompts[i] for i in group], device=device)
            cache = model.new_cache(len(group), length + max(steps, 0))
            logits, _ = model(tokens, cache=cache)
            finished = torch.zeros(len(group), dtype=torch.bool, device=device)
            for _ in range(steps):
                next_tokens = logits[:, -1].argmax(-1)
                for row, token in enumerate(next_tokens.tolist()):
                    if not finished[row]:
                        if token == stop_id:
                            finished[row] = True
                        else:
                            answers[group[row]].append(token)
                if finished.all():
                    break
                logits, _ = model(next_tokens[:, None], cache=cache)
    return answers


def qa_accuracy(model: Transformer, template: ChatTemplate, pairs: list[dict], max_new_tokens: int,
                prefix: str) -> tuple[dict[str, float], list[dict]]:
    """Exact-match accuracy over `pairs` ({question, answer, attribute}), overall and per attribute.

    Returns metrics named `{prefix}` and `{prefix}_{attribute}`, and every (question, expected, answer).
    """
    if not pairs:
        return {}, []
    prompts = [template.encode_prompt([{"role": "user", "content": p["question"]}]) for p in pairs]
    generated = greedy_answers(model, prompts, template.end_of_turn, max_new_tokens)
    results, by_attribute = [], defaultdict(list)
    for pair, ids in zip(pairs, generated):
        answer = template.tokenizer.decode(ids, skip_special_tokens=True)
        correct = normalize_answer(answer) == normalize_answer(pair["answer"])
        results.append({"question": pair["question"], "expected": pair["answer"], "answer": answer, "correct": correct})
        by_attribute[pair.get("attribute") or "answer"].append(correct)
    metrics = {prefix: sum(r["correct"] for r in results) / len(results)}
    if len(by_attribute) > 1:
        for attribute, marks in sorted(by_attribute.items()):
            metrics[f"{prefix}_{attribute}"] = sum(marks) / len(marks)
    return metrics, results
