"""A Hugging Face checkpoint's tokenizer (`base_model=hf`): its tokenizer.json (byte-level BPE, or the
SentencePiece-style BPE of Llama 2, TinyLlama and Mistral, whose tokenizer.model also gives each piece's score and
type for llama.cpp), the tokens that frame its sequences (BOS, EOS, padding, whether it adds BOS), and its chat
template when it has one (else the pipeline's chat tokens are added)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from llmpipe.errors import InputDataError
from llmpipe.text.chat_template import end_of_turn_token
from llmpipe.text.tokenizer import SUPPORTED_KINDS, gguf_tokenizer_model, is_sentencepiece_bpe


@dataclass
class ImportedTokenizer:
    tokenizer: Tokenizer
    special_tokens: dict[str, str]     # by role (end_of_document, end_of_turn, and the pipeline's chat roles)
    chat_template: dict | None         # the checkpoint's own, or None
    added: list[str]                   # tokens the import added to the vocabulary
    sequence_tokens: dict              # the checkpoint's {bos, eos, pad, add_bos} (llmpipe.text.tokenizer)
    sentencepiece: dict | None = None  # SentencePiece-style: tokenizer.model's {scores, types} by id, when it has one


def import_tokenizer(source: Path, special_tokens: dict[str, str]) -> ImportedTokenizer:
    """A checkpoint's `tokenizer.json` as the pipeline's tokenizer: byte-level BPE (GPT-2, Llama 3, Qwen2
    pre-tokenizers) or SentencePiece-style BPE (`tokenizers`' own reading of the file is the encoding).

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
    if gguf_tokenizer_model(tokenizer) is None:
        raise InputDataError(f"{path}: this tokenizer kind is not supported; supported: {SUPPORTED_KINDS}")
    template = checkpoint_chat_template(source)
    eos = declared_token(source, tokenizer, "eos")
    if template is not None:  # its own chat format: the end of a document and of a turn come from it
        specials = {"end_of_document": eos or template["eos_token"],
                    "end_of_turn": end_of_turn_token(template, tokenizer, path)}
        added = []
    else:
        specials = dict(special_tokens)
        if eos is not None:
            specials["end_of_document"] = eos
        added = [token for token in dict.fromkeys(specials.values()) if tokenizer.token_to_id(token) is None]
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    prefix = post_processor_prefix(tokenizer)
    bos = declared_token(source, tokenizer, "bos") or prefix
    add_bos = tokenizer_config(source).get("add_bos_token")
    sequence_tokens = {"bos": bos, "eos": specials["end_of_document"], "pad": declared_token(source, tokenizer, "pad"),
                       "add_bos": bos is not None and (add_bos if isinstance(add_bos, bool) else prefix is not None)}
    pieces = sentencepiece_pieces(source / "tokenizer.model") if is_sentencepiece_bpe(tokenizer) else None
    return ImportedTokenizer(tokenizer, specials, template, added, sequence_tokens, pieces)


def protobuf_fields(data: bytes, where: Path):
    """(field number, value) of each field of a protobuf message: varints as ints, fixed 32/64-bit and
    length-delimited values as bytes (enough to read SentencePiece's model file without protobuf)."""
    position = 0

    def varint() -> int:
        nonlocal position
        value = shift = 0
        while True:
            if position >= len(data):
                raise InputDataError(f"{where}: not a SentencePiece model file (truncated protobuf)")
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while position < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
            continue
        length = {1: 8, 5: 4}.get(wire) if wire != 2 else varint()
        if length is None or position + length > len(data):
            raise InputDataError(f"{where}: not a SentencePiece model file (protobuf wire type {wire} at byte "
                                 f"{position})")
        yield number, data[position:position + length]
        position += length


def sentencepiece_pieces(path: Path) -> dict | None:
    """tokenizer.model's pieces as {"tokens", "scores", "types"} by id (SentencePiece's ModelProto: field 1 holds
    the pieces, each with its text (1), score (2) and type (3: llama.cpp's token types)), or None without the file."""
    if not path.is_file():
        return None
    tokens, scores, types = [], [], []
    for number, piece in protobuf_fields(path.read_bytes(), path):
        if number != 1:
            continue
        fields = dict(protobuf_fields(piece, path))
        tokens.append(fields.get(1, b"").decode("utf-8", errors="replace"))
        scores.append(struct.unpack("<f", fields[2])[0] if 2 in fields else 0.0)
        types.append(fields.get(3, 1))
    return {"tokens": tokens, "scores": scores, "types": types}


def tokenizer_config(source: Path) -> dict:
    path = source / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise InputDataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise InputDataError(f"{path}: expected a JSON object")
    return config


def declared_token(source: Path, tokenizer: Tokenizer, kind: str) -> str | None:
    """The `kind` ("bos", "eos", "pad") token a checkpoint declares: tokenizer_config.json's (or
    special_tokens_map.json's) `<kind>_token`, else config.json's `<kind>_token_id` (as llama.cpp's converter
    reads them); None when neither names a token of the vocabulary."""
    special_map = source / "special_tokens_map.json"
    for declared in (tokenizer_config(source),
                     json.loads(special_map.read_text("utf-8")) if special_map.is_file() else {}):
        token = declared.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return token
    config = source / "config.json"
    if config.is_file():
        token_id = json.loads(config.read_text("utf-8")).get(f"{kind}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        if isinstance(token_id, int) and not isinstance(token_id, bool):
            return tokenizer.id_to_token(token_id)
    return None


def post_processor_prefix(tokenizer: Tokenizer) -> str | None:
    """The special token the tokenizer's post-processor puts before every text (Llama's BOS), or None."""
    processor = json.loads(tokenizer.to_str()).get("post_processor") or {}
    steps = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None


def checkpoint_chat_template(source: Path) -> dict | None:
    """{template, bos_token, eos_token} from tokenizer_config.json (or chat_template.jinja), or None."""
    config = tokenizer_config(source)
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
