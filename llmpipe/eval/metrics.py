"""Measurements of a model on held-out data, shared by pretraining, fine-tuning and evaluation:
- `language_model_loss`: mean next-token loss over token windows, and `perplexity_metrics` (loss,
  perplexity, bits per UTF-8 byte of the original text, which does not depend on the tokenizer);
- `unigram_bits_per_byte`: the baseline of a model that knows only token frequencies (counted shard by
  shard, in chunks);
- `answer_loss`: mean loss per answer token of chat examples (the fine-tuning validation loss);
- `next_token_distributions` and `mean_kl_divergence`: how far a variant's predictions are from a reference;
- `generation_tokens_per_second`: greedy generation speed through the engine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from llmpipe.data.tokens import token_chunks
from llmpipe.model.transformer import Transformer
from llmpipe.runner.heartbeat import Heartbeat


@torch.no_grad()
def language_model_loss(model: Transformer, tokens: np.ndarray, max_tokens: int | None, batch_size: int,
                        device=None, label: str = "") -> tuple[float, int]:
    """(mean loss in nats per predicted token, number of predicted tokens) over the first `max_tokens`,
    in non-overlapping windows of the model's context (a progress line every 30 s, labelled `label`), on
    `device` (default: the model's)."""
    device = device or model.embed_tokens.weight.device
    context_length = model.config.context_length
    data = torch.from_numpy(np.asarray(tokens[:max_tokens]).astype(np.int64))  # a slice of TokenShards: an array
    windows = [data[start:start + context_length + 1] for start in range(0, len(data) - 1, context_length)]
    total, count, done = 0.0, 0, 0
    with Heartbeat(f"{label}perplexity:", len(windows), "windows") as beat:
        for length in sorted({len(w) for w in windows}):  # the last window may be shorter
            same = [w for w in windows if len(w) == length]
            for i in range(0, len(same), batch_size):
                batch = torch.stack(same[i:i + batch_size]).to(device)
                _, loss = model(batch[:, :-1], batch[:, 1:], loss_reduction="sum")
                total += float(loss)
                count += batch[:, 1:].numel()
                done += len(batch)
                beat.tick(done)
    return total / max(count, 1), count


def bits_per_byte(mean_loss: float, predicted_tokens: int, split_tokens: int, split_bytes: int) -> float:
    """Nats per token → bits per UTF-8 byte, scaling the byte count when only part of the split was used."""
    covered_bytes = split_bytes * predicted_tokens / max(split_tokens - 1, 1)
    return mean_loss * predicted_tokens / (math.log(2) * covered_bytes)


def perplexity_metrics(model: Transformer, tokens: np.ndarray, split_counts: dict, max_tokens: int,
                       batch_size: int = 16, device=None, label: str = "") -> dict[str, float]:
    """val_loss, val_perplexity and val_bpb on the first `max_tokens` of a split (counts from meta.json)."""
    loss, predicted = language_model_loss(model, tokens, max_tokens, batch_size, device, label)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
            "val_bpb": bits_per_byte(loss, predicted, split_counts["tokens"], split_counts["utf8_bytes"])}


def unigram_bits_per_byte(train_tokens, validation_tokens, vocab_size: int, validation_bytes: int) -> float:
    """Bits per byte of the add-one-smoothed unigram distribution of the training tokens, counted and
    scored in chunks (memory does not grow with the splits; one chunk, one sum, for splits that fit in it)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in token_chunks(train_tokens):
        counts += np.bincount(chunk, minlength=vocab_size)
    smoothed = counts.astype(np.float64) + 1.0
    log_probabilities = np.log(smoothed / smoothed.sum())
    nats = sum(-log_probabilities[chunk].sum() for chunk in token_chunks(validation_tokens, start=1))
    return float(nats / (math.log(2) * validation_bytes))


@torch.no_grad()
def next_token_distributions(model: Transformer, tokens: np.ndarray, max_tokens: int,
                             label: str = "") -> torch.Tensor:
    """Log-probabilities of the next token at every position of non-overlapping windows (computed on the model's
    device, returned in CPU memory)."""
    device = model.embed_tokens.weight.device
    context = model.config.context_length
    data = torch.from_numpy(np.asarray(tokens[:max_tokens]).astype(np.int64))
    windows = [data[i:i + context] for i in range(0, len(data) - context + 1, context)] or [data]
    log_probs = []
    with Heartbeat(f"{label}next-token distributions:", len(windows), "windows") as beat:
        for window in windows:
            log_probs.append(model(window[None].to(device))[0][0].float().log_softmax(-1).cpu())  # fp32 whatever the weights
            beat.tick(len(log_probs))
    return torch.cat(log_probs)


def mean_kl_divergence(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over positions of KL(reference ‖ variant), in nats."""
    return float((reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1).mean())
