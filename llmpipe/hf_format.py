"""Our model in Hugging Face transformers' LlamaForCausalLM layout: config.json fields and tensor names.

Our module names already follow LlamaForCausalLM's (we use the same rotate_half rotary convention),
so the tensors map by adding the "model." prefix; the output head keeps its name and is left out when
tied to the embeddings.
"""

from __future__ import annotations

import torch

from llmpipe.model import ModelConfig, Transformer


def hf_llama_config(config: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.config.tie_embeddings:
                state[name] = tensor
        else:
            state[f"model.{name}"] = tensor
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def hf_model(model: Transformer):
    """A transformers LlamaForCausalLM holding the same weights (needs the optional `transformers`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = hf_llama_config(model.config)
    for key in ("architectures", "model_type", "torch_dtype"):
        config.pop(key)
    hf = LlamaForCausalLM(LlamaConfig(**config))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return hf.eval()
