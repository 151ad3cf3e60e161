"""The chunked loss equals the full-logits loss: value and gradients, masked targets, tied and untied heads."""

import pytest
import torch
import torch.nn.functional as F

from llmpipe.model import loss as loss_module
from llmpipe.model.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    full_logits_cross_entropy,
)
from llmpipe.model.transformer import ModelConfig, Transformer


def masked_targets(shape, vocab_size) -> torch.Tensor:
    """Random targets with a masked prompt at the start of each row and padding at the end of one."""
    targets = torch.randint(0, vocab_size, shape)
    targets[:, :3] = IGNORE_INDEX
    targets[0, -4:] = IGNORE_INDEX
    return targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, None])  # None: one chunk at this size
def test_chunked_loss_and_its_gradients_equal_the_full_logits_ones(reduction, chunk_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(61, 16, requires_grad=True)
    targets = masked_targets((3, 11), 61)
    chunked = chunked_cross_entropy(hidden, weight, targets, reduction, chunk_tokens)
    full = full_logits_cross_entropy(F.linear(hidden, weight), targets, reduction)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    for mine, reference in zip(torch.autograd.grad(chunked * 0.37, (hidden, weight)),
                               torch.autograd.grad(full * 0.37, (hidden, weight))):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    masked_rows = (targets == IGNORE_INDEX).reshape(-1)
    assert torch.autograd.grad(chunked_cross_entropy(hidden, weight, targets, reduction, chunk_tokens),
                               hidden)[0].reshape(-1, 16)[masked_rows].abs().max() == 0


@pytest.mark.parametrize("tie", [True, False])
def test_the_models_loss_and_every_gradient_are_those_of_the_full_logits(tie, monkeypatch):
    monkeypatch.setattr(loss_module, "LOGITS_PER_CHUNK", 97 * 7)  # 7 tokens per chunk: several chunks
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, context_length=24, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                    ffn_hidden=48, tie_embeddings=tie))
    tokens, targets = torch.randint(0, 97, (2, 24)), masked_targets((2, 24), 97)
    results = {}
    for full in (False, True):
        model.full_logits_loss = full
        model.zero_grad(set_to_none=True)
        logits, loss = model(tokens, targets, loss_reduction="sum")
        assert (logits is not None) == full  # the chunked loss never builds the logits
        (loss / 40).backward()
        results[full] = loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.testing.assert_close(results[False][0], results[True][0], rtol=1e-6, atol=1e-5)
    assert ("lm_head.weight" in results[False][1]) != tie
    for name, gradient in results[True][1].items():
        torch.testing.assert_close(results[False][1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_under_bf16_autocast_the_chunked_loss_is_the_full_logits_one():
    torch.manual_seed(0)
    hidden = torch.randn(4, 10, 32, requires_grad=True)
    weight = torch.randn(97, 32, requires_grad=True)
    targets = masked_targets((4, 10), 97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_cross_entropy(hidden, weight, targets, "sum")
        full = full_logits_cross_entropy(F.linear(hidden, weight), targets, "sum")
    assert torch.equal(chunked, full)  # one chunk: the same bf16 products, the same fp32 softmax
    for mine, reference in zip(torch.autograd.grad(chunked, (hidden, weight)), torch.autograd.grad(full, (hidden, weight))):
        assert mine.dtype == reference.dtype == torch.float32
        torch.testing.assert_close(mine, reference, rtol=1e-2, atol=1e-2)


def test_a_frozen_head_gets_no_gradient_and_no_grad_mode_builds_no_graph():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8)  # frozen (LoRA's base)
    targets = torch.randint(0, 10, (6,))
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=4)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        assert not chunked_cross_entropy(hidden, weight, targets).requires_grad
