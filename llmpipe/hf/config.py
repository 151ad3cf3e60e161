"""The mapping between our ModelConfig and a Hugging Face config.json of the families our transformer covers
(Llama, Mistral, Qwen2, Qwen3), both ways: `hf_config` (export, as the family's own transformers class) and
`model_config_from_hf` (import; what our model does not implement is refused by key)."""

from __future__ import annotations

import math

from llmpipe.errors import InputDataError, SettingError
from llmpipe.model.transformer import FAMILIES, ModelConfig

# Each family's transformers class, and what it adds to the Llama layout (ModelConfig's options).
FAMILY_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
FAMILY_OPTIONS = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}


def hf_config(config: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
              pad_token_id: int | None = None, torch_dtype: str = "float32") -> dict:
    """config.json for `config` as its family's transformers class (LlamaForCausalLM, Qwen2ForCausalLM, ...), for
    weights stored in `torch_dtype`."""
    family = {
        "llama": {"attention_bias": False, "mlp_bias": False},
        "mistral": {"sliding_window": None},
        "qwen2": {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer},
        "qwen3": {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                  "max_window_layers": config.n_layer},
    }[config.family]
    return {
        "architectures": [FAMILY_CLASSES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **config.rope_scaling} if config.rope_scaling else None,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        **family,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_from_hf(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, Llama 3.1 scaling or None) from either config.json form: transformers 4's `rope_theta` +
    `rope_scaling`, or transformers 5's `rope_parameters`."""
    parameters = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta") or parameters.get("rope_theta") or 10000.0  # typed by ModelConfig
    scaling = hf.get("rope_scaling") or parameters
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise InputDataError(f"{where}: rope scaling {kind!r} is not supported (only Llama 3.1's 'llama3')")
    missing = [key for key in ROPE_SCALING_KEYS if key not in scaling]
    if missing:
        raise InputDataError(f"{where}: llama3 rope scaling lacks {missing}")
    for key in ROPE_SCALING_KEYS:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InputDataError(f"{where}: rope scaling {key}: expected a number > 0, got {value!r}")
    return theta, {key: scaling[key] for key in ROPE_SCALING_KEYS}


# Our ModelConfig's names for the config.json keys.
HF_KEYS = {"vocab_size": "vocab_size", "context_length": "max_position_embeddings", "n_layer": "num_hidden_layers",
           "d_model": "hidden_size", "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
           "ffn_hidden": "intermediate_size", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
           "tie_embeddings": "tie_word_embeddings"}

# Keys whose other values need what our model does not implement, and the value (or null) that it does.
UNSUPPORTED = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "num_local_experts": None,
               "num_experts": None, "partial_rotary_factor": 1.0, "use_sliding_window": False}


def check_attention_is_full(hf: dict, where: str) -> None:
    """Every layer attends to the whole context: Mistral's `sliding_window` at least the context length (or null),
    Qwen's only where `use_sliding_window` is on, and `layer_types` (transformers 5) all full attention."""
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings")
    if hf.get("model_type") in ("llama", "mistral") and window is not None and not (
            isinstance(window, int) and isinstance(context, int) and window >= context):
        raise InputDataError(f"{where}: sliding_window = {window!r} is smaller than the context length "
                             f"(max_position_embeddings = {context!r}); sliding-window attention is not supported "
                             "(only null or a window at least the context length)")
    layer_types = hf.get("layer_types") or []
    partial = sorted({kind for kind in layer_types if kind != "full_attention"})
    if partial:
        raise InputDataError(f"{where}: layer_types has {partial[0]!r} layers; only 'full_attention' is supported")


def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """A config.json of a supported family → ModelConfig; what our model does not implement is refused by key."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise InputDataError(f"{where}: model_type is {family!r}; supported: {', '.join(FAMILIES)}")
    for key, supported in UNSUPPORTED.items():
        if hf.get(key, supported) not in (supported, None):
            raise InputDataError(f"{where}: {key} = {hf[key]!r} is not supported (only {supported!r})")
    check_attention_is_full(hf, where)
    theta, scaling = rope_from_hf(hf, where)
    missing = [key for key in ("vocab_size", "max_position_embeddings", "num_hidden_layers", "hidden_size",
                               "num_attention_heads", "intermediate_size") if key not in hf]
    if missing:
        raise InputDataError(f"{where}: key {missing[0]!r} is missing")
    values = {ours: hf.get(theirs) for ours, theirs in HF_KEYS.items()}  # as the file has them: typed by ModelConfig
    values["n_kv_head"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    values["rms_norm_eps"] = hf.get("rms_norm_eps", 1e-6)
    values["tie_embeddings"] = hf.get("tie_word_embeddings", False)
    try:
        return ModelConfig(**values, rope_theta=theta, rope_scaling=scaling, family=family, **FAMILY_OPTIONS[family])
    except SettingError as exc:
        raise InputDataError(f"{where}: {HF_KEYS.get(exc.field, exc.field)}: {exc}") from None
    except ValueError as exc:
        raise InputDataError(f"{where}: not a valid {FAMILY_CLASSES[family]} config ({exc})") from None
