"""Measurements that compare model variants on the same data: perplexity, bits per byte, QA accuracy,
KL divergence from the full-precision model, and generation speed."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from llmpipe.generate import SamplingSettings, generate_tokens
from llmpipe.lm_data import bits_per_byte, language_model_loss
from llmpipe.model import Transformer


def perplexity_metrics(model: Transformer, tokens: np.ndarray, split_counts: dict, max_tokens: int,
                       batch_size: int = 16) -> dict[str, float]:
    loss, predicted = language_model_loss(model, tokens, model.config.context_length, max_tokens, batch_size, "cpu")
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
            "val_bpb": bits_per_byte(loss, predicted, split_counts["tokens"], split_counts["utf8_bytes"])}


@torch.no_grad()
def next_token_distributions(model: Transformer, tokens: np.ndarray, max_tokens: int) -> torch.Tensor:
    """Log-probabilities of the next token at every position of non-overlapping windows."""
    context = model.config.context_length
    data = torch.from_numpy(np.asarray(tokens[:max_tokens]).astype(np.int64))
    windows = [data[i:i + context] for i in range(0, len(data) - context + 1, context)] or [data]
    return torch.cat([model(w[None])[0][0].log_softmax(-1) for w in windows])


def mean_kl_divergence(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over positions of KL(reference ‖ variant), in nats."""
    return float((reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1).mean())


@torch.no_grad()
def generation_tokens_per_second(model: Transformer, prompt: list[int], new_tokens: int, repeats: int = 5) -> float:
    """Greedy generation speed: the fastest of `repeats` timed runs after a warm-up (the fastest run is
    the one least slowed down by whatever else the machine was doing)."""
    settings = SamplingSettings(max_new_tokens=new_tokens)
    list(generate_tokens(model, prompt, settings))  # warm up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        produced = len(list(generate_tokens(model, prompt, settings)))
        best = max(best, produced / (time.perf_counter() - start))
    return best
