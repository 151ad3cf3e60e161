"""Training checkpoints for resuming a killed run, in safetensors + JSON (never pickle).

A checkpoint is a directory `step-NNNNNNN/` with
- model.safetensors     the weights (tied embeddings stored once),
- training.safetensors  AdamW moments and step counts, and the torch random-number-generator state,
- state.json            step, optimizer hyperparameters, the metric history so far, anything else the
                        loop needs (e.g. the best validation score).
It is written to a temporary directory and renamed, so a kill never leaves a partial checkpoint.

Checkpoints live outside the stage's DVC outputs, under `<repo>/checkpoints/<stage>/<key>/`, where
`key` hashes the stage's params and input hashes: a changed param or input starts fresh, a rerun of
the same stage resumes. `<repo>` is DVC_ROOT, so experiments in temporary copies share them too.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmpipe.model_io import load_state_into, write_model
from llmpipe.pipeline import atomic, layout
from llmpipe.pipeline.errors import InputDataError

STEP_DIR = re.compile(r"^step-(\d{7})$")


def checkpoint_key(params: dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"params": params, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{name}": value.detach().cpu().contiguous()
               for index, entries in state["state"].items() for name, value in entries.items()
               if isinstance(value, torch.Tensor)}
    return tensors, state["param_groups"]


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_parameter.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_parameter, "param_groups": groups})


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor file goes through here: safetensors only, one clear line when unreadable."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise InputDataError(f"{path}: unreadable checkpoint file ({exc}); delete the checkpoint directory "
                             f"{path.parent} to start over".splitlines()[0]) from None


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    @classmethod
    def for_stage(cls, stage: str, params: dict, input_hashes: dict[str, str]) -> "CheckpointStore":
        """The store of this stage run: `<repo>/checkpoints/<stage>/<hash of params and inputs>/`."""
        return cls(layout.checkpoints_dir(stage, checkpoint_key(params, input_hashes)))

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := STEP_DIR.match(p.name)))

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.directory / f"step-{steps[-1]:07d}" if steps else None

    def save(self, step: int, model, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        path = self.directory / f"step-{step:07d}"
        tensors, groups = optimizer_to_tensors(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        with atomic.atomic_path(path, directory=True) as temp:
            write_model(temp, model)
            save_file(tensors, str(temp / "training.safetensors"))
            (temp / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups},
                                                        indent=1, sort_keys=True) + "\n", encoding="utf-8")
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.directory / f"step-{old:07d}", ignore_errors=True)
        return path

    def load(self, path: Path, model, optimizer: torch.optim.Optimizer) -> dict:
        """Restore weights, optimizer and RNG from `path`; returns state.json."""
        try:
            state = json.loads((path / "state.json").read_text("utf-8"))
            history = state["history"]
            if not (isinstance(state["step"], int) and isinstance(state["param_groups"], list)
                    and all(isinstance(history[kind], list) and all(isinstance(row, dict) for row in history[kind])
                            for kind in ("train", "eval"))):
                raise ValueError("state.json does not hold step, history and param_groups as the loop writes them")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputDataError(f"{path}: unreadable checkpoint ({exc}); delete it to start over".splitlines()[0]) from None
        tensors = _read_tensors(path / "training.safetensors")
        load_state_into(model, path / "model.safetensors")
        try:
            optimizer_from_tensors(optimizer, tensors, state["param_groups"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise InputDataError(f"{path}: optimizer state does not match the model ({exc}); "
                                 "delete the checkpoint to start over".splitlines()[0]) from None
        torch.set_rng_state(tensors["rng.torch"])
        return state

    def save_best(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Keep the weights of the best step so far, so a resumed run can still end on them."""
        with atomic.atomic_path(self.directory / "best.safetensors") as temp:
            save_file({k: v.cpu().contiguous() for k, v in state.items() if not k.startswith("rope_")},
                      str(temp), metadata={"step": str(step)})

    def load_best(self) -> dict[str, torch.Tensor]:
        return _read_tensors(self.directory / "best.safetensors")

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
