"""Chat-token tuning: fine-tune only the embeddings of the chat template's special tokens.

The chat template marks the turns with special tokens (`<|user|>`, `<|assistant|>`, `<|end|>`) that
pretraining text never contains. `finetune.method=chat_tokens` trains only their rows of the input
embedding and of the output head (the same matrix when embeddings are tied); every other weight stays
as pretrained, the end-of-document token's row too (it starts every plain-text document). The model
learns the format (where a question ends, where to answer, when to stop) but cannot store new facts, so
each answer is what pretraining put in the model: on the embedded world this transfers to the held-out
people much better than full or LoRA fine-tuning, which also learn the fine-tuning people's answers by
heart (docs/seeds.md).

    train_only_token_rows(model, chat_token_ids(template))   # before building the optimizer

Frozen rows get a zero gradient; AdamW then leaves them exactly as they were, provided the weight decay is
0 (decoupled decay would shrink them too: `finetune_settings` refuses that combination).
"""

from __future__ import annotations

from typing import Iterable

import torch

from llmpipe.errors import PipelineError
from llmpipe.model.transformer import Transformer
from llmpipe.model.weights import cast_weights
from llmpipe.text.chat_template import ChatTemplate


def chat_token_ids(template: ChatTemplate) -> list[int]:
    """The ids of the special tokens the chat template's markup uses, but end-of-document's (also where a role
    shares it: a checkpoint whose end of sequence is its end of turn, as the pipeline's own models/hf export).
    None left (the template marks turns only with that token, or with plain text) is refused in one line."""
    tokenizer = template.tokenizer
    ids = sorted(template.markup_special_ids() - {tokenizer.end_of_document_id})
    if not ids:
        eod = tokenizer.special_tokens["end_of_document"]
        raise PipelineError(f"finetune.method=chat_tokens: the chat template of {tokenizer.directory} has no special "
                            f"token to train but {eod}, the end-of-document token, which stays frozen (every plain "
                            "text starts with it); use finetune.method=lora or full")
    return ids


def train_only_token_rows(model: Transformer, token_ids: Iterable[int]) -> list[str]:
    """Freeze `model` except the rows `token_ids` of its embedding and output head; the trained weights' names.
    Those two are held in fp32 (their master copies) while the frozen blocks keep their dtype (bf16 checkpoints)."""
    ids = sorted(set(token_ids))
    vocab_size = model.config.vocab_size
    if not ids or not all(0 <= i < vocab_size for i in ids):
        raise ValueError(f"token ids {ids} are not rows of a {vocab_size}-token embedding")
    cast_weights(model, torch.float32, modules=("embed_tokens", "lm_head"))
    for parameter in model.parameters():
        parameter.requires_grad = False
    trained = []
    for name, weight in (("embed_tokens.weight", model.embed_tokens.weight), ("lm_head.weight", model.lm_head.weight)):
        if weight.requires_grad:  # tied: the output head is the embedding, already done
            continue
        rows = torch.zeros(vocab_size, 1, dtype=weight.dtype, device=weight.device)
        rows[ids] = 1.0
        weight.requires_grad = True
        weight.register_hook(lambda gradient, rows=rows: gradient * rows)
        trained.append(name)
    return trained
