"""Our model in Hugging Face transformers' LlamaForCausalLM layout, and the export directory.

Our module names already follow LlamaForCausalLM's (we use the same rotate_half rotary convention),
so the tensors map by adding the "model." prefix; the output head keeps its name and is left out when
tied to the embeddings. The quantize stage writes the export (config, safetensors weights, tokenizer
files, chat template):

    AutoModelForCausalLM.from_pretrained("models/hf"); AutoTokenizer.from_pretrained("models/hf")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmpipe.chat_template import ROLES, ChatTemplate
from llmpipe.model import ModelConfig, Transformer
from llmpipe.tokenizer import LoadedTokenizer


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
        "rope_scaling": {"rope_type": "llama3", **config.rope_scaling} if config.rope_scaling else None,
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


def write_hf_directory(directory: Path, model: Transformer, tokenizer: LoadedTokenizer) -> None:
    """Write the export into `directory` (callers make it atomic)."""
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    specials = tokenizer.special_tokens
    bos_id, eos_id = tokenizer.end_of_document_id, tokenizer.special_ids["end_of_turn"]
    config = hf_llama_config(model.config, bos_token_id=bos_id, eos_token_id=eos_id)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": [eos_id, bos_id], "pad_token_id": bos_id}, indent=2) + "\n")
    save_file(hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer.directory / "tokenizer.json"),
        bos_token=specials["end_of_document"], eos_token=specials["end_of_turn"], pad_token=specials["end_of_document"],
        additional_special_tokens=[specials[r] for r in ROLES if r in specials],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = ChatTemplate(tokenizer).jinja()
    fast.save_pretrained(str(directory))
