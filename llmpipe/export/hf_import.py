"""Importing a Hugging Face Llama-family checkpoint (`base_model=hf`): its config, weights, tokenizer and
chat template, as the pipeline's base model.

- `read_hf_directory`: config.json + safetensors (one file or shards; pickles refused) → our Transformer,
  refusing by key what our model does not implement (biases, sliding windows, experts, other ropes);
- `import_checkpoint`: the same, with the vocabulary fitted to the imported tokenizer;
- `import_tokenizer`: tokenizer.json (byte-level BPE only), its end-of-sequence token, and its chat
  template when it has one (else the pipeline's chat tokens are added).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer

from llmpipe.chat_template import end_of_turn_token
from llmpipe.model import ModelConfig, Transformer
from llmpipe.pipeline.errors import InputDataError
from llmpipe.tokenizer import SUPPORTED_KINDS, gguf_pre_tokenizer

HF_WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_from_hf(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, Llama 3.1 scaling or None) from either config.json form: transformers 4's `rope_theta` +
    `rope_scaling`, or transformers 5's `rope_parameters`."""
    parameters = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta") or parameters.get("rope_theta") or 10000.0)
    scaling = hf.get("rope_scaling") or parameters
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise InputDataError(f"{where}: rope scaling {kind!r} is not supported (only Llama 3.1's 'llama3')")
    missing = [key for key in ROPE_SCALING_KEYS if key not in scaling]
    if missing:
        raise InputDataError(f"{where}: llama3 rope scaling lacks {missing}")
    return theta, {key: scaling[key] for key in ROPE_SCALING_KEYS}


def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """A LlamaForCausalLM config.json → ModelConfig; what our model does not implement is refused by key."""
    if hf.get("model_type") != "llama":
        raise InputDataError(f"{where}: model_type is {hf.get('model_type')!r}; only Llama-architecture checkpoints "
                             "(model_type 'llama') are supported")
    unsupported = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "sliding_window": None,
                   "num_local_experts": None, "num_experts": None, "partial_rotary_factor": 1.0}
    for key, supported in unsupported.items():
        if hf.get(key, supported) not in (supported, None):
            raise InputDataError(f"{where}: {key} = {hf[key]!r} is not supported (only {supported!r})")
    theta, scaling = rope_from_hf(hf, where)
    try:
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]), context_length=int(hf["max_position_embeddings"]),
            n_layer=int(hf["num_hidden_layers"]), d_model=int(hf["hidden_size"]),
            n_head=int(hf["num_attention_heads"]),
            n_kv_head=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            ffn_hidden=int(hf["intermediate_size"]), head_dim=hf.get("head_dim"), rope_theta=theta,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=scaling)
    except KeyError as missing:
        raise InputDataError(f"{where}: key {missing} is missing") from None
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"{where}: not a valid Llama config ({exc})") from None


def read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (one file, or the shards its index lists).
    Pickled weights (.bin, .pt) are refused: loading them could run code."""
    index = directory / HF_WEIGHTS_INDEX
    if index.is_file():
        files = sorted({directory / name for name in json.loads(index.read_text("utf-8"))["weight_map"].values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for pattern in PICKLED_WEIGHTS for p in directory.glob(pattern)]
        hint = (f"; {pickled[0]} is a pickle, which the pipeline never loads: convert it to safetensors first"
                if pickled else "")
        raise InputDataError(f"{directory}: no *.safetensors weights{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (OSError, SafetensorError, ValueError) as exc:
            raise InputDataError(f"{file}: not a readable safetensors file ({exc})".splitlines()[0]) from None
    return tensors


def read_hf_config(directory: str | Path) -> ModelConfig:
    """A checkpoint's config.json alone → ModelConfig (no weights are read)."""
    config_path = Path(directory) / "config.json"
    try:
        hf = json.loads(config_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(f"{config_path}: not a readable config.json ({exc})".splitlines()[0]) from None
    return model_config_from_hf(hf, str(config_path))


def read_hf_directory(directory: str | Path) -> Transformer:
    """A Hugging Face LlamaForCausalLM directory → our Transformer with the same weights (float32)."""
    directory = Path(directory)
    model = Transformer(read_hf_config(directory))
    expected = model.state_dict()
    state = {}
    for name, tensor in read_hf_tensors(directory).items():
        ours = name.removeprefix("model.")
        if ours not in expected:
            raise InputDataError(f"{directory}: tensor {name} has no place in a Llama model")
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise InputDataError(f"{directory}: tensor {name} has shape {tuple(tensor.shape)}, the config needs "
                                 f"{tuple(expected[ours].shape)}")
        state[ours] = tensor.float()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if model.config.tie_embeddings else set()))
    if missing:
        raise InputDataError(f"{directory}: tensors missing for the config: {missing[:3]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def fit_vocabulary(model: Transformer, vocab_size: int, known_tokens: int) -> Transformer:
    """The model with exactly `vocab_size` embedding rows, for a tokenizer whose first `known_tokens` ids are
    the checkpoint's own: padding rows beyond the tokenizer are dropped, and rows of tokens the import added
    (the chat special tokens) start at the mean of the known rows."""
    if model.config.vocab_size == vocab_size == known_tokens:
        return model
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("rope_")}
    for name in ("embed_tokens.weight", "lm_head.weight"):
        known = state[name][:known_tokens]
        state[name] = torch.cat([known, known.mean(0, keepdim=True).expand(vocab_size - known_tokens, -1)]).clone()
    resized = Transformer(ModelConfig(**{**model.config.to_dict(), "vocab_size": vocab_size}))
    if resized.config.tie_embeddings:
        state.pop("lm_head.weight")
    resized.load_state_dict(state, strict=False)
    return resized.eval()


def import_checkpoint(directory: str | Path, vocab_size: int) -> Transformer:
    """A Hugging Face Llama checkpoint as the pipeline's base model, for its tokenizer plus what the import
    added (`vocab_size` tokens in all)."""
    from tokenizers import Tokenizer

    known = Tokenizer.from_file(str(Path(directory) / "tokenizer.json")).get_vocab_size()
    return fit_vocabulary(read_hf_directory(directory), vocab_size, known)


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
