"""How big is a model preset: exact parameter count (built on the meta device, nothing allocated) and
the memory its weights need at each precision, plus training and KV-cache estimates."""

from __future__ import annotations

from llmpipe.model.transformer import ModelConfig, count_parameters
from llmpipe.model.weights import empty_model

# Bits per weight of each storage format (block formats include their fp16 scales: GGUF Q8_0, Q4_0).
WEIGHT_FORMATS = [("fp32", 32.0), ("bf16", 16.0), ("int8 (Q8_0)", 8.5), ("int4 (Q4_0)", 4.5)]


def parameter_count(config: ModelConfig) -> int:
    return count_parameters(empty_model(config))


def size_report(config: ModelConfig) -> dict:
    parameters = parameter_count(config)
    return {
        "parameters": parameters,
        "weights_bytes": {name: int(parameters * bits / 8) for name, bits in WEIGHT_FORMATS},
        # fp32 weights + fp32 gradients + two fp32 AdamW moments; activations not included
        "training_adamw_fp32_bytes": parameters * 16,
        # keys and values of every layer, per token of context, in bf16
        "kv_cache_bf16_bytes_per_token": 2 * config.n_layer * config.n_kv_head * config.head_dim * 2,
    }


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count} B"
