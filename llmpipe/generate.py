"""Text generation: the autoregressive loop with a key/value cache, and next-token probabilities.

Each step feeds only the newest token (the cache holds the keys and values of everything before),
turns the last position's logits into a distribution and picks a token:
- greedy (temperature 0): the most likely token;
- sampling: logits / temperature, keep the `top_k` most likely and the smallest set whose probability
  reaches `top_p` (nucleus), renormalize, draw with a seeded generator.
It stops at a stop token (end of document / end of turn), at `max_new_tokens`, or at the context end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from llmpipe.model import Transformer


@dataclass
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


def pick_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    if settings.temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(next_token_distribution(logits, settings), 1, generator=generator))


@torch.no_grad()
def generate_tokens(model: Transformer, prompt: list[int], settings: SamplingSettings,
                    stop_ids: set[int] = frozenset(), use_cache: bool = True) -> Iterator[int]:
    """Yield generated token ids one at a time (for streaming). `use_cache=False` recomputes the whole
    sequence every step (slow; for checking and benchmarking the cache)."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    limit = min(settings.max_new_tokens, model.config.context_length - len(prompt))
    if limit <= 0:
        return
    tokens = torch.tensor([prompt], device=device)
    cache = model.new_cache(1, len(prompt) + limit) if use_cache else None
    logits, _ = model(tokens, cache=cache)
    for _ in range(limit):
        token = pick_token(logits[0, -1].cpu(), settings, generator)
        yield token
        if token in stop_ids:
            return
        if use_cache:
            logits, _ = model(torch.tensor([[token]], device=device), cache=cache)
        else:
            tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
            logits, _ = model(tokens)


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
