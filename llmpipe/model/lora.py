"""LoRA: low-rank adapters on chosen linear layers (Hu et al., 2021).

A target layer y = W x becomes y = W x + (alpha / rank) · B A dropout(x), with W frozen, A (rank × in)
initialized small and random, B (out × rank) initialized to zero, so training starts exactly at the base
model. Merging folds the update into W: W' = W + (alpha / rank) · B A, giving a plain model that later
stages read like any other (`merge_lora` does it in place, without a second copy of the model). The adapter
alone (A and B of every target) is saved as PEFT saves one (`adapter_config.json` +
`adapter_model.safetensors`), so `peft.PeftModel.from_pretrained` and vLLM load it onto the base model in
Hugging Face layout (the pretrained model, exported as llmpipe.hf.export does).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from llmpipe.atomic import json_text
from llmpipe.errors import ParamError
from llmpipe.model.transformer import Transformer


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only errors from these loggers meanwhile."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterShape(Protocol):
    """What the adapters look like (finetune's `lora` section: llmpipe.train.finetune_settings.LoRASettings)."""
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    base_bits: int  # 16: the frozen weight as stored; 4: NF4 (QLoRA)


NF4_BLOCK = 64  # weights per NF4 scale (QLoRA's block size)


@functools.cache
def _torchao_nf4():
    """torchao's NF4 tensor module, imported on first use: ~1.5 s, so only QLoRA loads torchao (which logs its
    missing CUDA kernels and a PyTorch deprecation while it imports)."""
    with _quiet("torchao", "torch.utils._pytree"):
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    return nf4_tensor


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (a whole number of NF4 blocks: check_rank refuses others) as torchao's NF4 tensor: 4-bit
    normal-float codes, a scale per 64 weights, the scales themselves quantized per block of up to 256; it
    dequantizes to `weight`'s dtype."""
    scales = weight.numel() // NF4_BLOCK
    return _torchao_nf4().to_nf4(weight.detach(), NF4_BLOCK, math.gcd(scales, 256))


def is_nf4(weight: torch.Tensor) -> bool:
    return isinstance(weight, _torchao_nf4().NF4Tensor)


def is_target(name: str, settings: AdapterShape) -> bool:
    """Whether `name` (a module's weight: `layers.0.self_attn.q_proj.weight`) is a target layer's weight."""
    module, _, kind = name.rpartition(".")
    return kind == "weight" and module.rpartition(".")[2] in settings.target_modules


def nf4_as_loaded(settings: AdapterShape):
    """For `load_model(convert=...)` under a 4-bit base: each target layer's weight becomes NF4 as soon as it is
    read, so the frozen base is never held whole in 16 bits (a 7B model: 3.8 GB, not 13.5); others pass as read."""
    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return to_nf4(tensor) if is_target(name, settings) else tensor
    return convert


class LoRALinear(nn.Linear):
    """A linear layer with a frozen weight and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, settings: AdapterShape):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta", dtype=base.weight.dtype)
        self.quantized = settings.base_bits == 4
        if self.quantized:  # converted here, or already as it was loaded (nf4_as_loaded)
            self.weight = nn.Parameter(base.weight if is_nf4(base.weight) else to_nf4(base.weight),
                                       requires_grad=False)
        else:
            self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias  # frozen too (Qwen2's query/key/value biases), or None
        self.scaling = settings.alpha / settings.rank
        # The adapters train in fp32 whatever the frozen weight's dtype (bf16 checkpoints: QLoRA's practice).
        self.lora_A = nn.Parameter(torch.empty(settings.rank, base.in_features, device=base.weight.device,
                                               dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, settings.rank, device=base.weight.device,
                                               dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(settings.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:  # dequantized a layer at a time, forward and again backward (torchao's linear_nf4)
            frozen = _torchao_nf4().linear_nf4(x, self.weight)
            frozen = frozen if self.bias is None else frozen + self.bias.to(frozen.dtype)
        else:
            frozen = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return frozen + (self.scaling * update).to(frozen.dtype)

    def merged_weight(self, stored: torch.Tensor | None = None) -> torch.Tensor:
        """W + (alpha / rank) · B A, summed in fp32 and rounded once to W's dtype; W is `stored` when given (the
        weight as the checkpoint stores it, which an NF4 weight only approximates), else the layer's own."""
        weight = stored if stored is not None else (
            self.weight.get_original_weight() if self.quantized else self.weight)
        return (weight.float() + self.scaling * (self.lora_B @ self.lora_A)).to(weight.dtype)


def check_rank(model: Transformer, settings: AdapterShape, section: str) -> None:
    """A rank above a target layer's smaller dimension adds parameters and time but no expressiveness (the update
    B·A has at most that rank): refused, naming the key (`section`.rank) and the bound, before any work; so is an
    NF4 base (base_bits 4) for a layer that is not a whole number of NF4 blocks."""
    layers = [(name, module) for name, module in model.named_modules()
              if name.rpartition(".")[2] in settings.target_modules and isinstance(module, nn.Linear)]
    if not layers:
        return
    if settings.base_bits == 4:
        for name, layer in layers:
            if layer.weight.numel() % NF4_BLOCK:
                raise ParamError(f"{section}.base_bits: 4 needs whole {NF4_BLOCK}-weight NF4 blocks, and {name} "
                                 f"has {layer.weight.numel()} weights; use 16")
    name, layer = min(layers, key=lambda item: min(item[1].in_features, item[1].out_features))
    bound = min(layer.in_features, layer.out_features)
    if settings.rank > bound:
        raise ParamError(f"{section}.rank: expected at most {bound}, the smaller dimension of {name} "
                         f"({layer.out_features} × {layer.in_features}), got {settings.rank}")


def add_lora(model: Transformer, settings: AdapterShape) -> list[str]:
    """Freeze every parameter and put adapters on the target layers; returns their names."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in settings.target_modules and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, settings))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no layer matches target_modules {list(settings.target_modules)}")
    return wrapped


def merge_lora(model: Transformer, stored: Callable[[str], torch.Tensor] | None = None) -> Transformer:
    """Fold every adapter into its layer's weight, in place, and put a plain linear layer (holding that weight)
    back in its place: `model` becomes a plain Transformer. An NF4 layer's adapter folds into its weight as
    stored (`stored(module name + ".weight")`: read from the checkpoint the fine-tune started from, a layer at a
    time), or else into the dequantized NF4 weight. Memory: one layer's update at a time, never a second copy of
    the model. Returns `model`, in eval mode."""
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                name = f"{module_name}.{child_name}" if module_name else child_name
                with torch.no_grad():
                    if child.quantized:
                        weight = nn.Parameter(child.merged_weight(
                            stored(f"{name}.weight") if stored is not None else None),
                                              requires_grad=False)
                    else:
                        child.weight.copy_(child.merged_weight())
                        weight = child.weight
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight, plain.bias = weight, child.bias
                setattr(module, child_name, plain)
    return model.eval()


ADAPTER_DIR = "adapter"  # under the fine-tuned model's directory


def peft_config(settings: AdapterShape) -> dict:
    """PEFT's adapter_config.json for these adapters on a LlamaForCausalLM."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": settings.rank,
            "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": list(settings.target_modules), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
            "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "revision": None}


def save_adapter(model: Transformer, settings: AdapterShape, directory: Path) -> None:
    """The adapters of `model` under `directory`/adapter, as PEFT writes them: tensor names are the Hugging Face
    module names (our names, which follow LlamaForCausalLM's, under `model.`) in PEFT's `base_model.model.` tree."""
    tensors = {f"base_model.model.model.{name}.weight": tensor.detach().cpu().contiguous()
               for name, tensor in model.state_dict().items() if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    (directory / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / ADAPTER_DIR / "adapter_config.json").write_text(json_text(peft_config(settings), sort_keys=False),
                                                                 encoding="utf-8")
