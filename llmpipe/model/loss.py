"""The language-model loss from the last hidden states: cross-entropy through the output head, a chunk of
tokens at a time, so the logits of all tokens never exist at once.

    loss = chunked_cross_entropy(hidden, head_weight, targets, reduction="sum")
    loss = full_logits_cross_entropy(F.linear(hidden, head_weight), targets)   # the same, from all logits

With a large vocabulary the logits are the largest tensors of a training step: tokens × vocabulary in fp32 for
the softmax, 8 GB for 16k tokens of Llama 3's 128,256, and as much again for their gradient. The chunked loss
(the idea of Liger-Kernel's fused linear cross-entropy, in plain PyTorch) takes the tokens through the head a
chunk at a time; each chunk's logits give its loss and, at once, its gradients with respect to the hidden
states and the head's weight (softmax − one-hot, through the head), and are freed. Only those two gradients
(the size of the hidden states and of the weight) wait for the backward pass, which scales them by the
incoming gradient. A chunk holds about `LOGITS_PER_CHUNK` logits whatever the batch. It does the three
matrix products the full-logits loss does (none recomputed), so it costs no throughput.

Targets equal to IGNORE_INDEX take no loss and give no gradient (masked prompt tokens, padding). Under
autocast the products run in the autocast dtype, as `nn.Linear`'s would, and the softmax in fp32. With one
chunk the loss is the full-logits loss bit for bit; gradients agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmpipe.model.targets import IGNORE_INDEX

LOGITS_PER_CHUNK = 2**26  # logits per chunk (256 MiB in fp32): 523 tokens at a 128,256-token vocabulary
REDUCTIONS = ("mean", "sum")


def full_logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits (..., vocabulary) of every token at once, in fp32 (what the chunked loss equals)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          reduction: str = "mean", chunk_tokens: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden` (..., d) through the head `weight` (vocabulary, d) against `targets` (...):
    summed over the target tokens, or their mean. `chunk_tokens`: tokens per chunk (default: about
    LOGITS_PER_CHUNK logits)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    chunk_tokens = chunk_tokens or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk_tokens)
    else:
        total, _, _ = _losses_and_gradients(hidden, weight, targets, dtype, chunk_tokens, False, False)
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The summed loss; its gradients are computed in the forward pass, chunk by chunk, and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk_tokens):
        with torch.autocast(hidden.device.type, enabled=False):  # `dtype` is autocast's, applied here explicitly
            total, grad_hidden, grad_weight = _losses_and_gradients(
                hidden, weight, targets, dtype, chunk_tokens, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if getattr(ctx, "done", False):  # the saved gradients are scaled in place: one backward pass only
            raise RuntimeError("the chunked cross-entropy's graph supports one backward pass (retain_graph unsupported)")
        ctx.done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden.mul_(grad_total),
                None if grad_weight is None else grad_weight.mul_(grad_total), None, None, None)


def _losses_and_gradients(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                          chunk_tokens: int, hidden_grad: bool, weight_grad: bool):
    """The summed loss over (tokens, d) `hidden`, and the gradients of that sum with respect to `hidden` and
    `weight` where asked (else None), one chunk of tokens at a time; products in `dtype`, softmax in fp32."""
    inputs, head = hidden.to(dtype), weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if hidden_grad else None
    grad_weight = None  # fp32, the sum over chunks
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, chunk_targets = inputs[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        log_probs = F.linear(chunk, head).float().log_softmax(dim=-1)
        total += F.nll_loss(log_probs, chunk_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if not (hidden_grad or weight_grad):
            continue
        # d(loss)/d(logits) = softmax − one-hot(target) on rows with a target, 0 on the others.
        kept = (chunk_targets != IGNORE_INDEX).unsqueeze(1)
        grad_logits = log_probs.exp_()
        grad_logits.scatter_add_(1, chunk_targets.clamp(min=0).unsqueeze(1), -kept.to(grad_logits.dtype))
        grad_logits = grad_logits.mul_(kept).to(dtype)
        del log_probs
        if hidden_grad:
            grad_hidden[start:start + chunk_tokens] = grad_logits @ head
        if weight_grad and grad_weight is None:
            grad_weight = (grad_logits.T @ chunk).float()
        elif weight_grad and dtype == grad_weight.dtype:
            grad_weight.addmm_(grad_logits.T, chunk)
        elif weight_grad:
            grad_weight += grad_logits.T @ chunk
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return total, grad_hidden, grad_weight
