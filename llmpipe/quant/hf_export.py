"""A Hugging Face transformers export: LlamaForCausalLM config, safetensors weights, tokenizer files.

    AutoModelForCausalLM.from_pretrained("models/hf"); AutoTokenizer.from_pretrained("models/hf")
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from llmpipe.chat_template import ChatTemplate
from llmpipe.hf_format import hf_llama_config, hf_state_dict
from llmpipe.model import Transformer
from llmpipe.tokenizer import LoadedTokenizer


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
        additional_special_tokens=[specials[r] for r in ("system", "user", "assistant")],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = ChatTemplate(tokenizer).jinja()
    fast.save_pretrained(str(directory))
