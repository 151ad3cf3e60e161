"""Our model in Hugging Face transformers' layout, as its family's class (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM), and the export directory.

Our module names already follow those classes' (we use the same rotate_half rotary convention),
so the tensors map by adding the "model." prefix; the output head keeps its name and is left out when
tied to the embeddings. That is also how a model directory's weights file names them
(llmpipe.model.weights), so the export's weights file is a hard link to the model's (or a copy, across
file systems): the same bytes, stored once. The quantize stage writes the export (config, safetensors
weights, tokenizer files, chat template); its BOS, EOS, padding and add-BOS behaviour are the tokenizer's
`sequence_tokens` (an imported checkpoint's own), and generation stops at EOS and at the end of a turn:

    AutoModelForCausalLM.from_pretrained("models/hf"); AutoTokenizer.from_pretrained("models/hf")
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from llmpipe.atomic import json_text
from llmpipe.hf.config import FAMILY_CLASSES, hf_config
from llmpipe.model.transformer import Transformer
from llmpipe.model.weights import WEIGHTS_FILE, dtype_name, state_dict_for_saving
from llmpipe.text.chat_template import ROLES, ChatTemplate
from llmpipe.text.tokenizer import LoadedTokenizer


def hf_model(model: Transformer):
    """A transformers model of the family's class holding the same weights."""
    # deferred: transformers' model classes take seconds to import; only the reference comparisons build one
    from transformers import AutoConfig, AutoModelForCausalLM

    config = hf_config(model.config)
    family = config.pop("model_type")
    for key in ("architectures", "torch_dtype"):
        config.pop(key)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config))
    missing, unexpected = hf.load_state_dict(state_dict_for_saving(model), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map onto {FAMILY_CLASSES[family]}: missing {missing}, "
                           f"unexpected {unexpected}")
    return hf.eval()


def share_weights_file(weights_file: Path, target: Path, model: Transformer) -> bool:
    """Hard-link (or copy) `weights_file`, the saved weights of `model`, to `target` when it names its tensors as
    the export does; False when it does not (a file written before model directories used these names)."""
    with safe_open(str(weights_file), framework="pt") as handle:
        if set(handle.keys()) != set(state_dict_for_saving(model)):
            return False
    try:
        os.link(weights_file, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(weights_file, target)
    return True


def write_hf_directory(directory: Path, model: Transformer, tokenizer: LoadedTokenizer,
                       weights_file: Path | None = None) -> None:
    """Write the export into `directory` (callers make it atomic); `weights_file`: the model's own saved weights,
    shared instead of written again when they are named as the export names them."""
    # deferred: transformers takes ~1.3 s to import; quantize starts (and checks its inputs) without it
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    specials, sequence = tokenizer.special_tokens, tokenizer.sequence_tokens
    bos_id, eos_id, pad_id = (tokenizer.token_id(token) for token in (sequence.bos, sequence.eos, sequence.pad))
    stop_ids = list(dict.fromkeys([eos_id, tokenizer.special_ids["end_of_turn"], tokenizer.end_of_document_id]))
    config = hf_config(model.config, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                       torch_dtype=dtype_name(model.dtype))
    (directory / "config.json").write_text(json_text(config, sort_keys=False), encoding="utf-8")
    (directory / "generation_config.json").write_text(json_text(
        {"bos_token_id": bos_id, "eos_token_id": stop_ids, "pad_token_id": pad_id}, sort_keys=False),
        encoding="utf-8")
    target = directory / WEIGHTS_FILE
    if weights_file is None or not share_weights_file(weights_file, target, model):
        save_file(state_dict_for_saving(model), str(target), metadata={"format": "pt"})
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer.directory / "tokenizer.json"),
        bos_token=sequence.bos, eos_token=sequence.eos, pad_token=sequence.pad, add_bos_token=sequence.add_bos,
        additional_special_tokens=[specials[r] for r in ROLES if r in specials],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = ChatTemplate(tokenizer).jinja()
    fast.save_pretrained(str(directory))
