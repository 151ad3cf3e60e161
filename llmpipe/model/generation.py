"""Text generation: the one decoding engine of the project, batched, with a key/value cache.

    engine = Engine(model, stop_ids={end_of_turn})
    engine.generate(prompts, SamplingSettings(max_new_tokens=24))   # every prompt's continuation
    for token in engine.stream(prompt, settings): ...                # one prompt, token by token

The CLI (`llmpipe generate`, `llmpipe chat`), QA evaluation, the MLflow model and the benchmarks all
decode through `Engine.decode`: prompts of equal length form one batch (no padding, positions line
up; or, with `padded=True`, prompts of any lengths, left-padded to the longest, their pads masked: one
batch instead of one per length, which is what a large model's decoding costs); each step feeds only the
newest tokens (the cache holds the keys and values of everything before), turns the last position's logits
into a distribution and picks a token per row:
- greedy (temperature 0): the most likely token;
- sampling: logits / temperature, keep the `top_k` most likely and the smallest set whose probability
  reaches `top_p` (nucleus), renormalize, draw with a generator seeded by `seed`.
A row ends at a stop token (not returned), after `max_new_tokens`, or at the end of the context.

A prompt too long for the context keeps its last tokens, leaving room for the answer: at least
min(max_new_tokens, context_length // 2) tokens (`fit_prompt`; callers count and report it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from llmpipe.model.transformer import Transformer


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = no top-k filter
    top_p: float = 1.0         # 1 = no nucleus filter
    seed: int = 0


def next_token_distribution(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Probabilities over the vocabulary after temperature, top-k and top-p; logits shape (vocab,)."""
    logits = logits.float() / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = logits.softmax(-1)
    if settings.top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(descending=True)
        before = sorted_probabilities.cumsum(-1) - sorted_probabilities  # mass of the more likely tokens
        sorted_probabilities[before >= settings.top_p] = 0.0
        probabilities = torch.zeros_like(probabilities).scatter(0, order, sorted_probabilities)
        probabilities /= probabilities.sum()
    return probabilities


def pick_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
    """The next token of every row; logits shape (batch, vocab)."""
    if settings.temperature <= 0:
        return logits.argmax(-1)
    return torch.cat([torch.multinomial(next_token_distribution(row.cpu(), settings), 1, generator=generator)
                      for row in logits]).to(logits.device)


def prompt_limit(context_length: int, max_new_tokens: int) -> int:
    """The longest prompt that still leaves room for min(max_new_tokens, context_length // 2) new tokens."""
    return context_length - max(1, min(max_new_tokens, context_length // 2))


def fit_prompt(prompt: list[int], context_length: int, max_new_tokens: int) -> list[int]:
    """The prompt, or its last `prompt_limit` tokens when it is longer."""
    return prompt[-prompt_limit(context_length, max_new_tokens):]


class Engine:
    def __init__(self, model: Transformer, stop_ids: Iterable[int] = (), use_cache: bool = True):
        self.model = model
        self.stop_ids = frozenset(stop_ids)
        self.use_cache = use_cache  # False recomputes the whole sequence every step (to check and time the cache)

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], settings: SamplingSettings, generator: torch.Generator,
               padded: bool = False) -> Iterator[torch.Tensor]:
        """The decoding loop: for prompts of one length (of any lengths when `padded`: left-padded, with the
        cache), yield the next token of every row, step by step (the caller decides when to stop listening)."""
        prompts = [fit_prompt(p, self.model.config.context_length, settings.max_new_tokens) for p in prompts]
        length = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0 or (not padded and any(len(p) != length for p in prompts)):
            raise ValueError("prompts decoded together must be non-empty and of one length (or padded)")
        if padded and not self.use_cache:
            raise ValueError("padded prompts are decoded with the cache")
        device = self.model.embed_tokens.weight.device
        steps = min(settings.max_new_tokens, self.model.config.context_length - length)
        if steps <= 0:
            return
        pads = [length - len(p) for p in prompts]
        tokens = torch.tensor([[0] * pad + p for pad, p in zip(pads, prompts)], device=device)
        cache = self.model.new_cache(len(prompts), length + steps) if self.use_cache else None
        if any(pads):  # row r's first pads[r] positions are no tokens
            positions = torch.arange(length + steps, device=device)[None, :]
            cache.valid = positions >= torch.tensor(pads, device=device)[:, None]
        logits, _ = self.model(tokens, cache=cache)
        for step in range(steps):
            next_tokens = pick_tokens(logits[:, -1], settings, generator)
            yield next_tokens
            if step == steps - 1:
                return
            if cache is not None:
                logits, _ = self.model(next_tokens[:, None], cache=cache)
            else:
                tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
                logits, _ = self.model(tokens)

    def stream(self, prompt: list[int], settings: SamplingSettings) -> Iterator[int]:
        """One prompt's continuation, token by token (for printing as it comes)."""
        generator = torch.Generator().manual_seed(settings.seed)
        for column in self.decode([prompt], settings, generator):
            token = int(column[0])
            if token in self.stop_ids:
                return
            yield token

    def generate(self, prompts: list[list[int]], settings: SamplingSettings, batch_size: int = 64,
                 on_batch: Callable[[int], None] | None = None, padded: bool = False) -> list[list[int]]:
        """Every prompt's continuation; prompts of equal length are decoded together (with `padded`, of any
        lengths, shortest first), `batch_size` at a time (after each batch, `on_batch` gets the number of
        prompts done so far)."""
        answers: list[list[int]] = [[] for _ in prompts]
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            by_length[0 if padded else len(prompt)].append(index)
        generator = torch.Generator().manual_seed(settings.seed)
        done = 0
        for _, indices in sorted(by_length.items()):
            indices.sort(key=lambda index: len(prompts[index]))  # stable: same-length prompts keep their order
            for start in range(0, len(indices), batch_size):
                group = indices[start:start + batch_size]
                finished = [False] * len(group)
                for column in self.decode([prompts[i] for i in group], settings, generator, padded):
                    for row, token in enumerate(column.tolist()):
                        if finished[row]:
                            continue
                        if token in self.stop_ids:
                            finished[row] = True
                        else:
                            answers[group[row]].append(token)
                    if all(finished):
                        break
                done += len(group)
                if on_batch is not None:
                    on_batch(done)
        return answers


class StreamingDecoder:
    """Turn a stream of token ids into text pieces, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


@torch.no_grad()
def top_next_tokens(model: Transformer, prompt: list[int], k: int) -> list[tuple[int, float]]:
    """The k most likely next tokens after `prompt` with their probabilities."""
    context = prompt[-model.config.context_length:]
    logits, _ = model(torch.tensor([context], device=model.embed_tokens.weight.device))
    probabilities = logits[0, -1].float().softmax(-1)
    top = torch.topk(probabilities, min(k, probabilities.numel()))
    return [(int(i), float(p)) for p, i in zip(top.values, top.indices)]
