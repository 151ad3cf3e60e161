"""Typed settings from params.yaml for the training stages: the model preset and the loop settings."""

from __future__ import annotations

from llmpipe.errors import ParamError
from llmpipe.model import ModelConfig
from llmpipe.params import StageParams
from llmpipe.training import TrainSettings

MODEL_KEYS = ("context_length", "n_layer", "d_model", "n_head", "n_kv_head", "ffn_hidden")


def model_config(params: StageParams, tokenizer_vocab_size: int | None) -> ModelConfig:
    """The `model` section → ModelConfig. `model.vocab_size: null` takes the tokenizer's size; a preset
    that fixes a vocabulary size (a published model's shape) must match the tokenizer to be trained."""
    values = {key: params.int(f"model.{key}", min=1) for key in MODEL_KEYS}
    vocab_size = params.get("model.vocab_size")
    if vocab_size is None:
        if tokenizer_vocab_size is None:
            raise ParamError("params.yaml: model.vocab_size is null and there is no tokenizer to take it from")
        vocab_size = tokenizer_vocab_size
    else:
        vocab_size = params.int("model.vocab_size", min=1)
        if tokenizer_vocab_size is not None and vocab_size != tokenizer_vocab_size:
            raise ParamError(f"params.yaml: model.vocab_size is {vocab_size} but the tokenizer has "
                             f"{tokenizer_vocab_size} tokens; set model.vocab_size: null to follow the tokenizer")
    head_dim = params.get("model.head_dim")
    try:
        return ModelConfig(
            vocab_size=vocab_size, **values,
            head_dim=None if head_dim is None else params.int("model.head_dim", min=2),
            rope_theta=params.float("model.rope_theta", above=0),
            rms_norm_eps=params.float("model.rms_norm_eps", above=0),
            tie_embeddings=params.bool("model.tie_embeddings"),
        )
    except ValueError as exc:
        raise ParamError(f"params.yaml: model: {exc}") from None


def train_settings(params: StageParams, section: str) -> TrainSettings:
    """The loop settings of `section` (pretrain or finetune)."""
    p = lambda key: f"{section}.{key}"  # noqa: E731
    settings = TrainSettings(
        max_steps=params.int(p("max_steps"), min=1),
        learning_rate=params.float(p("learning_rate"), above=0),
        min_learning_rate=params.float(p("min_learning_rate"), min=0),
        warmup_steps=params.int(p("warmup_steps"), min=0),
        weight_decay=params.float(p("weight_decay"), min=0),
        beta1=params.float(p("beta1"), min=0, max=0.9999),
        beta2=params.float(p("beta2"), min=0, max=0.99999),
        grad_clip=params.float(p("grad_clip"), min=0),
        eval_every=params.int(p("eval_every"), min=1),
        checkpoint_every=params.int(p("checkpoint_every"), min=0),
        log_every=params.int(p("log_every"), min=1),
        precision=params.str(p("precision"), choices=["fp32", "bf16"]),
        compile=params.bool(p("compile")),
    )
    if settings.min_learning_rate > settings.learning_rate:
        raise ParamError(f"params.yaml: {p('min_learning_rate')} ({settings.min_learning_rate}) must not exceed "
                         f"{p('learning_rate')} ({settings.learning_rate})")
    return settings


def global_batch_sequences(params: StageParams, section: str, context_length: int) -> int:
    """`global_batch_tokens` (when set) or `global_batch_sequences`, as a number of sequences."""
    tokens = params.get(f"{section}.global_batch_tokens", None)
    if tokens is None:
        return params.int(f"{section}.global_batch_sequences", min=1)
    tokens = params.int(f"{section}.global_batch_tokens", min=1)
    if tokens % context_length:
        raise ParamError(f"params.yaml: {section}.global_batch_tokens ({tokens}) must be a multiple of "
                         f"model.context_length ({context_length})")
    return tokens // context_length
