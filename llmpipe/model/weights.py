"""Save and load model directories: `model.safetensors` + `config.json`. Never pickle.

A model directory is what pretrain and finetune output and what generation, quantization and
evaluation read. Loading checks every tensor's name and shape against the config, so a file that
does not match (another preset, a truncated or corrupted file) is refused with a one-line error.
The loaded tensors become the model's parameters as they are (`empty_model` + `assign_weights`): the
file is memory-mapped, nothing is initialized at random first, and no second copy is made.

Tensor names are Hugging Face LlamaForCausalLM's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`
when untied), so the weights file is also the Hugging Face export's, byte for byte (llmpipe.hf.export links it
instead of writing it again, and DVC's cache stores it once); files with our module names (written before
that) load too.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llmpipe import atomic
from llmpipe.errors import InputDataError, SettingError
from llmpipe.model.transformer import ModelConfig, Transformer, rotary_tables

if TYPE_CHECKING:  # annotations only: loading weights runs no tokenizer code
    from llmpipe.text.tokenizer import LoadedTokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_KEY = "tokenizer_fingerprint"  # in config.json: the tokenizer the model was trained with
HF_PREFIX = "model."  # LlamaForCausalLM's decoder; its output head, lm_head, is outside it


def saved_name(name: str) -> str:
    """A module's tensor name as the weights file (and LlamaForCausalLM) names it."""
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def state_dict_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    """Weights as contiguous CPU tensors under their saved names; a tied output head is stored once (as the
    embedding)."""
    return {saved_name(name): tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()
            if not (model.config.tie_embeddings and name == "lm_head.weight")}


def write_model(directory: Path, model: Transformer, extra_config: dict | None = None) -> None:
    """Write weights and config into an existing directory (callers make it atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_saving(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"model": model.config.to_dict(), **(extra_config or {})}
    (directory / CONFIG_FILE).write_text(atomic.json_text(config), encoding="utf-8")


def save_model(directory: str | Path, model: Transformer, extra_config: dict | None = None) -> None:
    with atomic.atomic_path(directory, directory=True) as temp:
        write_model(temp, model, extra_config)


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InputDataError(f"{path}: not found; is {directory} a model directory written by the pipeline?")
    try:
        config = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise InputDataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputDataError(f"{path}: expected an object with a \"model\" object (the model's shape)")
    return config


def model_config_from_dict(values: dict, where: str) -> ModelConfig:
    """config.json's "model" object → ModelConfig, each value typed and ranged as params.yaml's are."""
    try:
        return ModelConfig(**values)
    except SettingError as exc:
        raise InputDataError(f"{where}: model.{exc.field}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"{where}: not a valid model config: {exc}") from None


_INITIALIZERS = ("uniform_", "normal_", "kaiming_uniform_", "zeros_", "ones_")


@contextlib.contextmanager
def _initializers_skipped() -> Iterator[None]:
    """torch.nn.init's initializers as no-ops: on the meta device they have no values to set, and the first
    random one there loads PyTorch's symbolic shapes (sympy), about 1 s of every stage's start."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALIZERS}
    for name in _INITIALIZERS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, initializer in saved.items():
            setattr(torch.nn.init, name, initializer)


def empty_model(config: ModelConfig) -> Transformer:
    """The model's modules with no weights yet (on the meta device: no memory, no random initialization);
    `assign_weights` fills them."""
    with torch.device("meta"), _initializers_skipped():
        return Transformer(config)


def assign_weights(model: Transformer, state: dict[str, torch.Tensor]) -> Transformer:
    """Make `state`'s tensors the parameters of `model` (an `empty_model`) as they are, without copying them;
    every parameter must be in `state` (a tied output head may be left out: it is tied again). The rotary tables
    are computed as the constructor does. Returns `model`."""
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        raise ValueError(f"no tensor for {missing[:3]}")
    config, device = model.config, model.embed_tokens.weight.device
    cos, sin = rotary_tables(config.head_dim, config.context_length, config.rope_theta, scaling=config.rope_scaling)
    model.register_buffer("rope_cos", cos.to(device), persistent=False)
    model.register_buffer("rope_sin", sin.to(device), persistent=False)
    return model


MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # what a model computes in
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_dtype(paths: list[Path]) -> torch.dtype:
    """The dtype most floating-point weights of these safetensors files are stored in (read from their headers
    alone), when a model computes in it (fp32, bf16, fp16); fp32 for any other (float64, fp8)."""
    elements: dict[str, int] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_slice(name)
                    kind = tensor.get_dtype()
                    if kind.startswith(("F", "BF")):
                        elements[kind] = elements.get(kind, 0) + math.prod(tensor.get_shape())
        except FileNotFoundError:
            raise InputDataError(f"{path}: not found") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputDataError(f"{path}: not a readable safetensors file ({exc})".splitlines()[0]) from None
    most = max(elements, key=elements.get, default="F32")
    return _SAFETENSORS_DTYPES.get(most, torch.float32)


def read_checked_tensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped, for any weights the pipeline loads: floating-point tensors
    converted to `dtype` (None: each kept in its own dtype when a model computes in it, else fp32; no copy when
    nothing changes) and only then checked finite, so a float64 1e300, finite in its file but infinite in float32,
    is refused naming the file and the tensor. Never unpickles."""
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise InputDataError(f"{path}: not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputDataError(f"{path}: not a readable safetensors file ({exc})".splitlines()[0]) from None
    for name, stored in state.items():
        if stored.is_floating_point():
            state[name] = _converted_and_checked(path, name, stored, dtype)
    return state


def _converted_and_checked(path: Path, name: str, stored: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A floating-point tensor of `path` in `dtype` (None: its own when a model computes in it, else fp32), refused
    naming the file and tensor when it is not finite there."""
    target = dtype or (stored.dtype if stored.dtype in MODEL_DTYPES.values() else torch.float32)
    converted = stored.to(target)
    if not torch.isfinite(converted).all():
        kind = "" if stored.dtype == target else (f" in {dtype_name(target)} (the file stores "
                                                  f"{dtype_name(stored.dtype)})")
        raise InputDataError(f"{path}: tensor {name} holds NaN or infinite values{kind}")
    return converted


def cast_weights(model: Transformer, dtype: torch.dtype, modules: tuple[str, ...] | None = None) -> Transformer:
    """The floating-point parameters of `model` (of the named `modules` only, if given) in `dtype`, in place; the
    rotary tables stay fp32. A tied output head stays the embedding. Returns `model`."""
    for name, module in model.named_modules():
        if modules is not None and name not in modules:
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)
    return model


def read_weight(weights_path: Path, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor of a model's weights file by its saved or module name (`layers.0.self_attn.q_proj.weight`), in
    `dtype` (None: its own) and checked finite, in memory of its own: the file is opened for this tensor alone
    and closed again, so no page of the others stays mapped (a merge reading the stored weights a layer at a
    time, a load that quantizes each weight as it comes)."""
    saved = name if name.startswith((HF_PREFIX, "lm_head.")) else saved_name(name)
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            stored = handle.get_tensor(saved)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputDataError(f"{weights_path}: tensor {saved} unreadable ({exc})".splitlines()[0]) from None
    return _converted_and_checked(weights_path, saved, stored, dtype)


def tensor_names(weights_path: Path) -> list[str]:
    """The tensor names a safetensors file holds (its header alone is read)."""
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return list(handle.keys())
    except FileNotFoundError:
        raise InputDataError(f"{weights_path}: not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputDataError(f"{weights_path}: not a readable safetensors file ({exc})".splitlines()[0]) from None


Convert = Callable[[str, torch.Tensor], torch.Tensor]  # (module name, tensor as read) → what the model holds


def load_state_into(model: Transformer, weights_path: Path, dtype: torch.dtype | None = None,
                    convert: Convert | None = None) -> None:
    """Load safetensors weights into `model` (an `empty_model`), checking names, shapes and values
    (read_checked_tensors) first; saved names (Hugging Face's) and our module names both load. The weights keep
    the file's dtype (`stored_dtype`) unless `dtype` is given. Without `convert` the file is memory-mapped (one
    copy, shared by processes that load it); with it, tensors are read one at a time and each replaced by
    `convert(name, tensor)` before the next is read (a 4-bit base: never the whole model in 16 bits)."""
    dtype = dtype or stored_dtype([weights_path])
    expected = {name: tensor for name, tensor in model.state_dict().items()
                if not (model.config.tie_embeddings and name == "lm_head.weight")}
    names = {name.removeprefix(HF_PREFIX): name for name in tensor_names(weights_path)}
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise InputDataError(f"{weights_path}: tensors do not match the model config "
                             f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    if convert is None:
        state = {name.removeprefix(HF_PREFIX): tensor
                 for name, tensor in read_checked_tensors(weights_path, dtype).items()}
        for name, tensor in state.items():
            _check_shape(weights_path, name, tensor, expected[name])
    else:
        state = {}
        for name, saved in names.items():
            tensor = read_weight(weights_path, saved, dtype)
            _check_shape(weights_path, name, tensor, expected[name])
            state[name] = convert(name, tensor)
    assign_weights(model, state)


def _check_shape(weights_path: Path, name: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    if tensor.shape != expected.shape:
        raise InputDataError(f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, the config "
                             f"needs {tuple(expected.shape)}")


def check_tokenizer(config: ModelConfig, recorded: str | None, model_path: str | Path,
                    tokenizer: LoadedTokenizer) -> None:
    """Refuse a model (its `config`, and the tokenizer fingerprint it `recorded`) and a tokenizer that do not
    belong together (another vocabulary, or the same size with other merges), naming both paths."""
    vocab_size = config.vocab_size
    if vocab_size == tokenizer.vocab_size and recorded in (None, tokenizer.fingerprint):
        return
    was = f"tokenizer {recorded}, " if recorded else ""
    raise InputDataError(f"{model_path} does not match {tokenizer.directory}: the model was trained with {was}"
                         f"{vocab_size} tokens, {tokenizer.directory} is tokenizer {tokenizer.fingerprint}, "
                         f"{tokenizer.vocab_size} tokens; rerun the pipeline (dvc repro) or use the matching tokenizer")


def check_model_directory(directory: str | Path, tokenizer: LoadedTokenizer | None = None) -> tuple[dict, ModelConfig]:
    """(config.json, the model's shape): what `load_model` checks before it reads a weight (with `tokenizer`, that
    the model belongs to it), for a stage to check its inputs before any work."""
    directory = Path(directory)
    config = read_config(directory)
    shape = model_config_from_dict(config.get("model", {}), str(directory / CONFIG_FILE))
    if tokenizer is not None:
        check_tokenizer(shape, config.get(TOKENIZER_KEY), directory, tokenizer)
    return config, shape


def load_model(directory: str | Path, device: str = "cpu", tokenizer: LoadedTokenizer | None = None,
               weights_file: str | Path | None = None, dtype: torch.dtype | None = None,
               convert: Convert | None = None) -> tuple[Transformer, dict]:
    """A model directory → (model in eval mode, its full config.json); with `tokenizer`, checked to match it.
    The weights are the directory's model.safetensors unless `weights_file` names another file, in the dtype
    they are stored in unless `dtype` is given, each replaced by `convert(name, tensor)` as it is read when
    given (load_state_into)."""
    directory = Path(directory)
    config, shape = check_model_directory(directory, tokenizer)
    model = empty_model(shape)
    load_state_into(model, Path(weights_file) if weights_file else directory / WEIGHTS_FILE, dtype, convert)
    return model.to(device).eval(), config
