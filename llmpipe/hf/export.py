"""Our model in Hugging Face transformers' LlamaForCausalLM layout, and the export directory.

Our module names already follow LlamaForCausalLM's (we use the same rotate_half rotary convention),
so the tensors map by adding the "model." prefix; the output head keeps its name and is left out when
tied to the embeddings. The quantize stage writes the export (config, safetensors weights, tokenizer
files, chat template):

    AutoModelForCausalLM.from_pretrained("models/hf"); AutoTokenizer.from_pretrained("models/hf")
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from llmpipe.hf.config import hf_llama_config
from llmpipe.model.transformer import Transformer
from llmpipe.pipeline.atomic import json_text
from llmpipe.text.chat_template import ROLES, ChatTemplate
from llmpipe.text.tokenizer import LoadedTokenizer


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
    (directory / "config.json").write_text(json_text(config, sort_keys=False), encoding="utf-8")
    (directory / "generation_config.json").write_text(json_text(
        {"bos_token_id": bos_id, "eos_token_id": [eos_id, bos_id], "pad_token_id": bos_id}, sort_keys=False),
        encoding="utf-8")
    save_file(hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer.directory / "tokenizer.json"),
        bos_token=specials["end_of_document"], eos_token=specials["end_of_turn"], pad_token=specials["end_of_document"],
        additional_special_tokens=[specials[r] for r in ROLES if r in specials],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = ChatTemplate(tokenizer).jinja()
    fast.save_pretrained(str(directory))
