"""A Hugging Face checkpoint's tokenizer (`base_model=hf`): its tokenizer.json (byte-level BPE only), its
end-of-sequence token, and its chat template when it has one (else the pipeline's chat tokens are added)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from llmpipe.errors import InputDataError
from llmpipe.text.chat_template import end_of_turn_token
from llmpipe.text.tokenizer import SUPPORTED_KINDS, gguf_pre_tokenizer


def import_tokenizer(source: Path, special_tokens: dict[str, str]
                     ) -> tuple[Tokenizer, dict[str, str], dict | None, list[str]]:
    """A checkpoint's `tokenizer.json` as the pipeline's tokenizer: (tokenizer, special tokens by role, its chat
    template or None, tokens added). Only byte-level BPE is supported (SentencePiece-style is refused).

    With a chat template (tokenizer_config.json `chat_template`, or chat_template.jinja), that template is
    the chat format: the end of a turn is the special token that closes an assistant turn in it. Without
    one, the chat uses the pipeline's format and `special_tokens`, added to the vocabulary when the
    checkpoint lacks them (their embeddings start at the mean of the others). Documents end with the
    checkpoint's own end-of-sequence token when it names one."""
    path = source / "tokenizer.json"
    if not path.is_file():
        raise InputDataError(f"{path}: not found; the checkpoint needs a `tokenizers` tokenizer.json "
                             "(a SentencePiece tokenizer.model alone is not supported)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise InputDataError(f"{path}: not a readable tokenizer.json ({exc})".splitlines()[0]) from None
    if gguf_pre_tokenizer(tokenizer) is None:
        raise InputDataError(f"{path}: this tokenizer kind is not supported; supported: {SUPPORTED_KINDS}")
    template = checkpoint_chat_template(source)
    if template is not None:  # its own chat format: the end of a document and of a turn come from it
        specials = {"end_of_document": checkpoint_eos_token(source, tokenizer) or template["eos_token"],
                    "end_of_turn": end_of_turn_token(template, tokenizer, path)}
        return tokenizer, specials, template, []
    specials = dict(special_tokens)
    eos = checkpoint_eos_token(source, tokenizer)
    if eos is not None:
        specials["end_of_document"] = eos
    missing = [token for token in dict.fromkeys(specials.values()) if tokenizer.token_to_id(token) is None]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    return tokenizer, specials, None, missing


def checkpoint_eos_token(source: Path, tokenizer: Tokenizer) -> str | None:
    """The end-of-sequence token a checkpoint declares (tokenizer_config.json, or config.json's id)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = source / name
        if path.is_file():
            eos = json.loads(path.read_text("utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
                return eos
    config = source / "config.json"
    if config.is_file():
        eos_id = json.loads(config.read_text("utf-8")).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int):
            return tokenizer.id_to_token(eos_id)
    return None


def checkpoint_chat_template(source: Path) -> dict | None:
    """{template, bos_token, eos_token} from tokenizer_config.json (or chat_template.jinja), or None."""
    config_path = source / "tokenizer_config.json"
    config = json.loads(config_path.read_text("utf-8")) if config_path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (source / "chat_template.jinja").is_file():
        template = (source / "chat_template.jinja").read_text("utf-8")
    if not template:
        return None

    def token(name: str) -> str:
        value = config.get(name) or ""
        return value.get("content", "") if isinstance(value, dict) else str(value)
    return {"template": template, "bos_token": token("bos_token"), "eos_token": token("eos_token")}
