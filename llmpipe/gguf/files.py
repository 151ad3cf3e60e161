"""GGUF files for llama.cpp (and Ollama, LM Studio, ...), written with the `gguf` package's GGUFWriter.

What goes in:
- the architecture llama.cpp runs the family as (`llama` for Llama and Mistral, `qwen2`, `qwen3`) and its
  metadata: context length, embedding length, block count, feed-forward length, head counts, rope
  dimension and base, RMS epsilon, file type;
- the tokenizer: byte-level BPE tokens and merges ("gpt2" model; "gpt-2", "llama-bpe" or "qwen2"
  pre-tokenizer), or SentencePiece-style tokens with their scores ("llama" model, as llama.cpp's converter
  writes a Llama 2 / Mistral tokenizer.model), token types (control for special tokens), the BOS, EOS,
  end-of-turn and padding ids and whether llama.cpp adds BOS (the tokenizer's `sequence_tokens`: an imported checkpoint's own), and the
  chat template as Jinja;
- the weights under llama.cpp's tensor names (with `attn_q.bias`.. for Qwen2, `attn_q_norm`/`attn_k_norm`
  for Qwen3). llama.cpp's llama rope rotates interleaved pairs while our model (like Hugging Face's)
  rotates halves, so for the llama architecture the rows of attn_q and attn_k are permuted within each
  head on export (and back on import); qwen2 and qwen3 rotate halves in llama.cpp too.

Each tensor is stored as the variant's block format when its rows are whole blocks, else as the
fallback format (as llama.cpp's quantizer falls back); 1-D tensors (norms) stay F32.
`read_gguf_model` turns a file back into a PyTorch model with exactly the (dequantized) weights it holds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from llmpipe import atomic
from llmpipe.config.params import params_section, setting
from llmpipe.errors import InputDataError, SettingError
from llmpipe.gguf.formats import FORMATS
from llmpipe.model.transformer import ModelConfig, Transformer, rotary_frequencies
from llmpipe.model.weights import assign_weights, dtype_name, empty_model
from llmpipe.runner.heartbeat import Heartbeat
from llmpipe.text.chat_template import ChatTemplate
from llmpipe.text.tokenizer import LoadedTokenizer, gguf_tokenizer_model

F32, F16 = "F32", "F16"
ROPE_SCALING_PREFIX = "llmpipe.rope_scaling."
VARIANTS = [F16, *FORMATS]


@params_section("quantize")
@dataclass(frozen=True)
class QuantizeSettings:
    variants: list[str] = setting(["F16", "Q8_0", "Q4_K", "Q4_1", "Q4_0", "Q2_K"], "GGUF files to write, one per "
                                  "format", choices=VARIANTS, unique=True)
    fallback: str = setting("Q4_0", "type for tensors whose rows are not whole blocks of a variant's format",
                            choices=["Q8_0", "Q4_0", "Q4_1", F16])
    embeddings: dict[str, str] = setting({"Q2_K": "Q4_K"}, "per variant: type for the token embeddings, which are "
                                         "also the output head when tied (other variants: their own type); "
                                         "llama.cpp's Q2_K mix keeps the head at Q6_K", values=VARIANTS)
    output: dict[str, str] = setting({}, "per variant: type for an untied output head, e.g. {Q2_K: Q4_K}",
                                     values=VARIANTS)
    model_name: str = setting("llmpipe", "general.name in the GGUF files and their file-name prefix", name=True)

    def __post_init__(self):
        for field in ("embeddings", "output"):
            unknown = [variant for variant in getattr(self, field) if variant not in self.variants]
            if unknown:
                raise SettingError(field, f"expected keys among {', '.join(self.variants)}, got {unknown} (list)")


def rope_frequency_factors(config: ModelConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor: how much Llama 3.1 scaling divides each rotary frequency."""
    plain = rotary_frequencies(config.head_dim, config.rope_theta)
    return (plain / rotary_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)).numpy().astype(np.float32)


@dataclass
class TensorPlan:
    """Where each weight goes in the file and in which type."""
    gguf_name: str
    source_name: str
    type_name: str   # F32, F16 or a FORMATS key
    permute_heads: int | None = None  # number of heads whose rows to permute (attn_q / attn_k)


# llama.cpp's architecture for each family (llmpipe.model.transformer.FAMILIES), and back.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FAMILY_OF_ARCHITECTURE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def gguf_tensor_names(config: ModelConfig) -> list[tuple[str, str, int | None]]:
    """(llama.cpp's name, ours, heads whose rows to permute for llama's interleaved rope or None) per tensor."""
    interleaved = GGUF_ARCHITECTURES[config.family] == "llama"
    names = [("token_embd.weight", "embed_tokens.weight", None)]
    for i in range(config.n_layer):
        prefix = f"layers.{i}."
        names += [
            (f"blk.{i}.attn_norm.weight", prefix + "input_layernorm.weight", None),
            (f"blk.{i}.attn_q.weight", prefix + "self_attn.q_proj.weight", config.n_head if interleaved else None),
            (f"blk.{i}.attn_k.weight", prefix + "self_attn.k_proj.weight", config.n_kv_head if interleaved else None),
            (f"blk.{i}.attn_v.weight", prefix + "self_attn.v_proj.weight", None),
        ]
        if config.qkv_bias:
            names += [(f"blk.{i}.attn_{x}.bias", f"{prefix}self_attn.{x}_proj.bias", None) for x in "qkv"]
        if config.qk_norm:
            names += [(f"blk.{i}.attn_{x}_norm.weight", f"{prefix}self_attn.{x}_norm.weight", None) for x in "qk"]
        names += [
            (f"blk.{i}.attn_output.weight", prefix + "self_attn.o_proj.weight", None),
            (f"blk.{i}.ffn_norm.weight", prefix + "post_attention_layernorm.weight", None),
            (f"blk.{i}.ffn_gate.weight", prefix + "mlp.gate_proj.weight", None),
            (f"blk.{i}.ffn_up.weight", prefix + "mlp.up_proj.weight", None),
            (f"blk.{i}.ffn_down.weight", prefix + "mlp.down_proj.weight", None),
        ]
    names.append(("output_norm.weight", "norm.weight", None))
    if not config.tie_embeddings:
        names.append(("output.weight", "lm_head.weight", None))
    return names


def plan_tensors(model: Transformer, type_name: str, fallback: str, keep_embeddings: str | None,
                 keep_output: str | None) -> list[TensorPlan]:
    """Choose each tensor's type: norms F32; embeddings/output as configured; the rest `type_name`,
    or `fallback` when its rows are not whole blocks of the format. Each value must fit the type chosen."""
    state = model.state_dict()
    plans = []
    for gguf_name, source, heads in gguf_tensor_names(model.config):
        tensor = state[source]
        chosen = type_name
        if tensor.dim() == 1:
            chosen = F32
        elif gguf_name == "token_embd.weight" and keep_embeddings:
            chosen = keep_embeddings
        elif gguf_name == "output.weight" and keep_output:
            chosen = keep_output
        tried = [chosen]
        if chosen in FORMATS and not FORMATS[chosen].fits(tensor.shape[-1]):
            chosen = fallback
            tried.append(chosen)
        if chosen in FORMATS and not FORMATS[chosen].fits(tensor.shape[-1]):
            formats = " and ".join(f"{name} (rows of multiples of {FORMATS[name].block_size})"
                                   for name in dict.fromkeys(tried))
            raise InputDataError(f"tensor {gguf_name} has rows of {tensor.shape[-1]} weights, which fit neither "
                                 f"{formats}; set quantize.fallback to F16, or use a model width that is a "
                                 f"multiple of {FORMATS[chosen].block_size}")
        if chosen != F32:
            check_float16_range(tensor, f"{source} ({gguf_name})", chosen)
        plans.append(TensorPlan(gguf_name, source, chosen, heads))
    return plans


FLOAT16_MAX = 65504.0


def check_float16_range(tensor: torch.Tensor, name: str, type_name: str) -> None:
    """F16 stores every weight in float16, the block formats their scales and minimums: a weight beyond float16's
    range would be written as infinity (a model that is finite in float32 yet broken)."""
    largest = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    if largest > FLOAT16_MAX:
        raise InputDataError(f"tensor {name} holds a weight of magnitude {largest:.3g}, beyond the float16 range "
                             f"({FLOAT16_MAX:g}) in which {type_name} stores weights or scales: the model is broken "
                             "(check the fine-tuned model's training)")


def permute_for_interleaved_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """rotate_half layout (each head: first half, second half) → llama.cpp's interleaved pairs."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)


def unpermute_from_interleaved_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    rows, columns = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def encode_tensor(values: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == F32:
        return np.asarray(values, dtype=np.float32)  # no copy of a float32 array
    if type_name == F16:
        return values.astype(np.float16)
    return FORMATS[type_name].quantize(values)


def decode_tensor(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    if type_name in (F32, F16):
        return np.asarray(data, dtype=np.float32).reshape(shape)
    return FORMATS[type_name].dequantize(np.asarray(data, dtype=np.uint8), shape)


def _merges(tokenizer: LoadedTokenizer) -> list[str]:
    model = json.loads(tokenizer.tokenizer.to_str())["model"]
    return [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]


ADDED_TOKEN_SCORE = -1000.0  # what llama.cpp's converter gives the tokens added to a SentencePiece vocabulary


def sentencepiece_scores_and_types(tokenizer: LoadedTokenizer, vocabulary: list[str]) -> tuple[list[float], list[int]]:
    """Each token's score and type for llama.cpp's SentencePiece tokenizer, as convert_hf_to_gguf.py writes them:
    the checkpoint's tokenizer.model pieces' (normal, unknown, control, byte, ...), when it had one; else types
    from the token's text and scores that order the merges as tokenizer.json does (llama.cpp merges the pair
    whose result scores highest; the converter would write -1000 for every token). Tokens of tokenizer.json's
    added tokens: control when special, else user-defined, score -1000."""
    pieces = tokenizer.sentencepiece
    if pieces is not None:
        scores = [float(score) for score in pieces["scores"][:len(vocabulary)]]
        types = list(pieces["types"][:len(vocabulary)])
    else:
        first_merge: dict[str, int] = {}
        for rank, merge in enumerate(_merges(tokenizer)):
            first_merge.setdefault(merge.replace(" ", ""), rank)
        scores = [-float(first_merge[token]) if token in first_merge else 0.0 for token in vocabulary]
        types = [gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", token) else gguf.TokenType.NORMAL
                 for token in vocabulary]
    scores += [ADDED_TOKEN_SCORE] * (len(vocabulary) - len(scores))
    types += [gguf.TokenType.USER_DEFINED] * (len(vocabulary) - len(types))
    for token_id, token in tokenizer.tokenizer.get_added_tokens_decoder().items():
        scores[token_id] = ADDED_TOKEN_SCORE
        types[token_id] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    return scores, [int(kind) for kind in types]


# general.file_type (gguf.LlamaFileType): llama.cpp has no "all Q4_K" type; Q4_K_S is its nearest.
FILE_TYPES = {F32: 0, F16: 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q2_K": 10, "Q4_K": 14}


def stored_shape(shape: tuple[int, ...], type_name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes) of a tensor of `shape` as stored in `type_name`: block formats as bytes per row."""
    if type_name in FORMATS:
        fmt = FORMATS[type_name]
        byte_shape = (*shape[:-1], shape[-1] // fmt.block_size * fmt.block_bytes)
        return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))
    dtype = np.dtype(np.float16 if type_name == F16 else np.float32)
    return tuple(shape), dtype, int(np.prod(shape)) * dtype.itemsize


def add_metadata(writer, config: ModelConfig, tokenizer: LoadedTokenizer, file_type: str, name: str) -> None:
    """The architecture's keys (the writer prefixes them with its name) and the tokenizer."""
    writer.add_name(name)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[file_type])

    vocabulary = [token for token, _ in sorted(tokenizer.tokenizer.get_vocab(with_added_tokens=True).items(),
                                               key=lambda item: item[1])]
    model, pre = gguf_tokenizer_model(tokenizer.tokenizer) or ("gpt2", "gpt-2")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocabulary)
    if model == "llama":
        scores, types = sentencepiece_scores_and_types(tokenizer, vocabulary)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        unknown = tokenizer.token_id(json.loads(tokenizer.tokenizer.to_str())["model"].get("unk_token"))
        if unknown is not None:
            writer.add_unk_token_id(unknown)
    else:
        special_ids = set(tokenizer.special_ids.values()) | {  # and every special token an imported tokenizer has
            token_id for token_id, token in tokenizer.tokenizer.get_added_tokens_decoder().items() if token.special}
        writer.add_token_types([gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL
                                for i in range(len(vocabulary))])
        writer.add_token_merges(_merges(tokenizer))
    sequence = tokenizer.sequence_tokens
    if sequence.bos is not None:
        writer.add_bos_token_id(tokenizer.token_id(sequence.bos))
    writer.add_eos_token_id(tokenizer.token_id(sequence.eos))
    writer.add_eot_token_id(tokenizer.special_ids["end_of_turn"])
    if sequence.pad is not None:
        writer.add_pad_token_id(tokenizer.token_id(sequence.pad))
    writer.add_add_bos_token(sequence.add_bos)
    writer.add_add_eos_token(False)  # the pipeline never appends EOS or SEP to a text
    writer.add_add_sep_token(False)
    writer.add_chat_template(ChatTemplate(tokenizer).jinja())
    if config.rope_scaling:  # Llama 3.1: llama.cpp reads the per-frequency factors (rope_freqs); we read these
        for key, value in config.rope_scaling.items():
            writer.add_float32(f"{ROPE_SCALING_PREFIX}{key}", float(value))


def write_gguf(path: str | Path, model: Transformer, tokenizer: LoadedTokenizer, plans: list[TensorPlan],
               file_type: str, name: str) -> int:
    """Write the GGUF file; returns the bytes its weights take (without metadata). Streamed: every tensor's
    place is written first, then each tensor is encoded and written in turn, so memory holds one encoded
    tensor beside the model (a progress line every 30 s)."""
    config = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    extra = {"rope_freqs.weight": rope_frequency_factors(config)} if config.rope_scaling else {}
    weight_bytes = 0
    with atomic.atomic_path(path) as temp:
        writer = gguf.GGUFWriter(str(temp), arch=GGUF_ARCHITECTURES[config.family])
        add_metadata(writer, config, tokenizer, file_type, name)
        for plan in plans:
            shape, dtype, nbytes = stored_shape(tuple(state[plan.source_name].shape), plan.type_name)
            quantized = plan.type_name in FORMATS
            writer.add_tensor_info(plan.gguf_name, shape, dtype, nbytes, raw_dtype=gguf.GGMLQuantizationType(
                FORMATS[plan.type_name].ggml_type) if quantized else None)
        for tensor_name, values in extra.items():
            writer.add_tensor_info(tensor_name, values.shape, values.dtype, values.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with Heartbeat(f"quantize: {file_type}:", len(plans), "tensors") as beat:
            for done, plan in enumerate(plans, 1):
                values = state[plan.source_name].float().numpy()
                if plan.permute_heads:
                    values = permute_for_interleaved_rope(values, plan.permute_heads)
                encoded = encode_tensor(values, plan.type_name)
                weight_bytes += encoded.nbytes
                writer.write_tensor_data(encoded)
                beat.tick(done)
        for values in extra.values():
            writer.write_tensor_data(values)
        writer.close()
    return weight_bytes


def check_gguf_structure(reader, path: str | Path) -> None:
    """What llama.cpp checks before it trusts a file: every tensor's data starts on the file's alignment,
    tensors follow each other without gaps or overlaps, and each one's bytes lie inside the file."""
    alignment = int(reader.alignment)
    start, end = int(reader.data_offset), len(reader.data)
    expected = start
    for tensor in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        offset, size = int(tensor.data_offset), int(tensor.n_bytes)
        if (offset - start) % alignment:
            raise InputDataError(f"{path}: tensor {tensor.name} starts at byte {offset}, not on the file's "
                                 f"{alignment}-byte alignment (a corrupted or hand-edited file)")
        if offset != expected:
            raise InputDataError(f"{path}: tensor {tensor.name} starts at byte {offset}, expected {expected} right "
                                 "after the previous tensor (a corrupted or hand-edited file)")
        if offset + size > end:
            raise InputDataError(f"{path}: tensor {tensor.name} ends at byte {offset + size}, past the end of the "
                                 f"{end}-byte file (truncated?)")
        expected = offset + -(-size // alignment) * alignment


def check_gguf_tokenizer(reader, path: str | Path, tokenizer: LoadedTokenizer) -> None:
    """The file's token list must be the tokenizer's vocabulary, id by id."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocabulary = [token for token, _ in sorted(tokenizer.tokenizer.get_vocab(with_added_tokens=True).items(),
                                               key=lambda item: item[1])]
    if tokens is None or list(tokens.contents()) != vocabulary:
        count = len(tokens.contents()) if tokens is not None else 0
        raise InputDataError(f"{path} does not match {tokenizer.directory}: its token list ({count} tokens) is not "
                             f"that tokenizer's vocabulary ({len(vocabulary)} tokens); rerun the quantize stage")


def check_gguf_file(path: str | Path, tokenizer: LoadedTokenizer | None = None):
    """A GGUF file's reader (memory-mapped: cheap), once its structure is checked and, with `tokenizer`, its token
    list matches: what every consumer checks before it reads any weight."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # truncated or not GGUF at all
        raise InputDataError(f"{path}: not a readable GGUF file ({exc})".splitlines()[0]) from None
    check_gguf_structure(reader, path)
    if tokenizer is not None:
        check_gguf_tokenizer(reader, path, tokenizer)
    return reader


def read_gguf_model(path: str | Path, tokenizer: LoadedTokenizer | None = None,
                    dtype: torch.dtype = torch.float32) -> Transformer:
    """A GGUF file written by `write_gguf` → a PyTorch model holding its dequantized weights in `dtype` (exactly
    them in fp32). The file's structure is checked first; with `tokenizer`, its token list must match."""
    reader = check_gguf_file(path, tokenizer)

    def field(key: str):
        if key not in reader.fields:
            raise InputDataError(f"{path}: GGUF metadata key {key} is missing")
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch not in FAMILY_OF_ARCHITECTURE:
        raise InputDataError(f"{path}: general.architecture is {arch!r}; expected one of "
                             f"{', '.join(FAMILY_OF_ARCHITECTURE)}")
    names = {t.name for t in reader.tensors}
    family = FAMILY_OF_ARCHITECTURE[arch]
    try:
        config = ModelConfig(
            vocab_size=int(field(f"{arch}.vocab_size")), context_length=int(field(f"{arch}.context_length")),
            n_layer=int(field(f"{arch}.block_count")), d_model=int(field(f"{arch}.embedding_length")),
            n_head=int(field(f"{arch}.attention.head_count")),
            n_kv_head=int(field(f"{arch}.attention.head_count_kv")),
            ffn_hidden=int(field(f"{arch}.feed_forward_length")), head_dim=int(field(f"{arch}.attention.key_length")),
            rope_theta=float(field(f"{arch}.rope.freq_base")),
            rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
            tie_embeddings="output.weight" not in names, family=family,
            qkv_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
            rope_scaling={key[len(ROPE_SCALING_PREFIX):]: float(reader.fields[key].contents())
                          for key in reader.fields if key.startswith(ROPE_SCALING_PREFIX)} or None)
    except SettingError as exc:
        raise InputDataError(f"{path}: inconsistent GGUF metadata ({exc.field}: {exc})") from None
    except ValueError as exc:
        raise InputDataError(f"{path}: inconsistent GGUF metadata ({exc})") from None
    model = empty_model(config)
    state = model.state_dict()  # shapes only (meta tensors), replaced tensor by tensor below
    tensors = {t.name: t for t in reader.tensors}
    type_names = {fmt.ggml_type: name for name, fmt in FORMATS.items()} | {0: F32, 1: F16}
    for gguf_name, source, heads in gguf_tensor_names(config):
        if gguf_name not in tensors:
            raise InputDataError(f"{path}: tensor {gguf_name} is missing")
        tensor = tensors[gguf_name]
        shape = tuple(state[source].shape)
        type_name = type_names.get(int(tensor.tensor_type))
        if type_name is None:
            raise InputDataError(f"{path}: tensor {gguf_name} has unsupported type {tensor.tensor_type.name}")
        try:
            values = decode_tensor(_read_tensor_data(path, tensor), type_name, shape)
        except ValueError as exc:
            raise InputDataError(f"{path}: tensor {gguf_name} does not hold {shape} values of {type_name} ({exc})") from None
        if heads:
            values = unpermute_from_interleaved_rope(values, heads)
        state[source] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dtype)
        if not torch.isfinite(state[source]).all():
            raise InputDataError(f"{path}: tensor {gguf_name} holds NaN or infinite values"
                                 + ("" if dtype == torch.float32 else f" in {dtype_name(dtype)}"))
    if config.tie_embeddings:
        del state["lm_head.weight"]
    return assign_weights(model, state).eval()


def _read_tensor_data(path: str | Path, tensor) -> np.ndarray:
    """A tensor's bytes as the reader's view types them, read into memory of their own: the reader's view is a
    memory map, whose pages would stay mapped (a second copy of the model in RSS) until the reader is gone."""
    view = tensor.data  # its dtype and shape only: no page of it is read
    return np.fromfile(path, dtype=view.dtype, count=view.size, offset=int(tensor.data_offset)).reshape(view.shape)


def size_row(variant: str, parameters: int, tensor_bytes: int, file_bytes: int, type_counts: dict[str, int]) -> dict:
    """One row of the size table, measured on a written file: bits per weight count the weights' bytes."""
    return {
        "format": variant,
        "bits_per_weight": 8 * tensor_bytes / parameters,
        "tensor_bytes": tensor_bytes,
        "file_bytes": file_bytes,
        "ratio_to_fp32": tensor_bytes / (4 * parameters),
        "ratio_to_fp16": tensor_bytes / (2 * parameters),
        "tensor_types": type_counts,
    }
