"""Importing the weights of a Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3; `base_model=hf`) as the
pipeline's base model (its tokenizer: llmpipe.hf.tokenizer).

- `read_hf_directory`: config.json + safetensors (one file or shards; pickles refused) → our Transformer,
  refusing by key what our model does not implement (output biases, sliding windows, experts, other ropes);
- `import_checkpoint`: the same, with the vocabulary fitted to the imported tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llmpipe.errors import InputDataError
from llmpipe.hf.config import model_config_from_hf
from llmpipe.model.transformer import ModelConfig, Transformer
from llmpipe.model.weights import assign_weights, empty_model, read_checked_tensors, stored_dtype


HF_WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def read_hf_tensors(directory: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (one file, or the shards its index lists), in `dtype`
    (None: the dtype most of them are stored in) and checked finite. Pickled weights (.bin, .pt) are refused:
    loading them could run code."""
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
    dtype = dtype or stored_dtype(files)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_checked_tensors(file, dtype))  # finite
    return tensors


def read_hf_config(directory: str | Path) -> ModelConfig:
    """A checkpoint's config.json alone → ModelConfig (no weights are read)."""
    config_path = Path(directory) / "config.json"
    try:
        hf = json.loads(config_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(f"{config_path}: not a readable config.json ({exc})".splitlines()[0]) from None
    return model_config_from_hf(hf, str(config_path))


def read_hf_directory(directory: str | Path, dtype: torch.dtype | None = None) -> Transformer:
    """A Hugging Face checkpoint directory of a supported family → our Transformer with the same weights, in
    `dtype` (None: the checkpoint's own)."""
    directory = Path(directory)
    model = empty_model(read_hf_config(directory))
    expected = model.state_dict()
    state = {}
    for name, tensor in read_hf_tensors(directory, dtype).items():
        ours = name.removeprefix("model.")
        if ours not in expected:
            raise InputDataError(f"{directory}: tensor {name} has no place in a {model.config.family} model")
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise InputDataError(f"{directory}: tensor {name} has shape {tuple(tensor.shape)}, the config needs "
                                 f"{tuple(expected[ours].shape)}")
        state[ours] = tensor  # the memory-mapped tensor itself when stored in the dtype asked for
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if model.config.tie_embeddings else set()))
    if missing:
        raise InputDataError(f"{directory}: tensors missing for the config: {missing[:3]}")
    return assign_weights(model, state).eval()


def fit_vocabulary(model: Transformer, vocab_size: int, known_tokens: int) -> Transformer:
    """The model with exactly `vocab_size` embedding rows, for a tokenizer whose first `known_tokens` ids are
    the checkpoint's own: padding rows beyond the tokenizer are dropped, and rows of tokens the import added
    (the chat special tokens) start at the mean of the known rows."""
    if model.config.vocab_size == vocab_size == known_tokens:
        return model
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("rope_")}
    for name in ("embed_tokens.weight", "lm_head.weight"):
        known = state[name][:known_tokens]
        mean = known.float().mean(0, keepdim=True).to(known.dtype)  # summed in fp32 whatever the weights' dtype
        state[name] = torch.cat([known, mean.expand(vocab_size - known_tokens, -1)]).clone()
    resized = empty_model(ModelConfig(**{**model.config.to_dict(), "vocab_size": vocab_size}))
    if resized.config.tie_embeddings:
        state.pop("lm_head.weight")
    return assign_weights(resized, state).eval()


def import_checkpoint(directory: str | Path, vocab_size: int, dtype: torch.dtype | None = None) -> Transformer:
    """A Hugging Face checkpoint as the pipeline's base model, for its tokenizer plus what the import
    added (`vocab_size` tokens in all), in `dtype` (None: the checkpoint's own)."""
    known = Tokenizer.from_file(str(Path(directory) / "tokenizer.json")).get_vocab_size()
    return fit_vocabulary(read_hf_directory(directory, dtype), vocab_size, known)
