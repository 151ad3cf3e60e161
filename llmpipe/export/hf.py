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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmpipe.chat_template import ChatTemplate
from llmpipe.model import ModelConfig, Transformer
from llmpipe.pipeline.errors import InputDataError
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
        additional_special_tokens=[specials[r] for r in ("system", "user", "assistant")],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = ChatTemplate(tokenizer).jinja()
    fast.save_pretrained(str(directory))


# Reading a Hugging Face Llama-family directory (our own export, or a checkpoint a user has on disk).
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


def read_hf_directory(directory: str | Path) -> Transformer:
    """A Hugging Face LlamaForCausalLM directory → our Transformer with the same weights (float32)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    try:
        hf = json.loads(config_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(f"{config_path}: not a readable config.json ({exc})".splitlines()[0]) from None
    model = Transformer(model_config_from_hf(hf, str(config_path)))
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
