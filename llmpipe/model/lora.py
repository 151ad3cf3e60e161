"""LoRA: low-rank adapters on chosen linear layers (Hu et al., 2021).

A target layer y = W x becomes y = W x + (alpha / rank) · B A dropout(x), with W frozen, A (rank × in)
initialized small and random, B (out × rank) initialized to zero, so training starts exactly at the base
model. Merging folds the update into W: W' = W + (alpha / rank) · B A, giving a plain model that later
stages read like any other (`merge_lora` does it in place, without a second copy of the model). The adapter alone (A and B of every target) is saved as safetensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from llmpipe.model.transformer import Transformer
from llmpipe.pipeline.atomic import json_text
from llmpipe.pipeline.params import setting

TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASettings:
    rank: int = setting(16, "rank of each adapter's update", min=1)
    alpha: float = setting(32.0, "update scale is alpha / rank", above=0)
    dropout: float = setting(0.0, "dropout on the adapters' input", min=0, max=0.9)
    target_modules: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "o_proj"), "layers that get adapters "
                                              "(also: gate_proj, up_proj, down_proj)", choices=list(TARGETABLE))


class LoRALinear(nn.Linear):
    """A linear layer with a frozen weight and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, settings: LoRASettings):
        super().__init__(base.in_features, base.out_features, bias=False, device=base.weight.device,
                         dtype=base.weight.dtype)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scaling = settings.alpha / settings.rank
        self.lora_A = nn.Parameter(torch.empty(settings.rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, settings.rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(settings.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)


def add_lora(model: Transformer, settings: LoRASettings) -> list[str]:
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


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its layer's weight, in place, and put a plain linear layer (holding that weight)
    back in its place: `model` becomes a plain Transformer. Memory: one layer's update at a time, never a
    second copy of the model. Returns `model`, in eval mode."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.weight.add_(child.scaling * (child.lora_B @ child.lora_A))
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight = child.weight
                setattr(module, child_name, plain)
    return model.eval()


def save_adapter(model: Transformer, settings: LoRASettings, directory: Path) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items() if ".lora_" in name}
    save_file(tensors, str(directory / "lora_adapter.safetensors"), metadata={"format": "pt"})
    (directory / "lora_adapter.json").write_text(json_text({**asdict(settings), "target_modules": list(settings.target_modules)},
                                                           sort_keys=False), encoding="utf-8")
