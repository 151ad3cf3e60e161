"""Training checkpoints for resuming a killed run: torch.distributed.checkpoint (DCP) shards in safetensors,
plus JSON; nothing is unpickled.

`step-NNNNNNN/` holds `sharded/shard-*.safetensors` (each process's weights and AdamW state, written through
DCP's HuggingFaceStorageWriter, whose index lives in the safetensors headers: DCP's default `.metadata` is a
pickle), `rng.safetensors` and `state.json` (step, metric history, best score, process count). `dcp.load`
reassembles the shards for any number of processes (2 FSDP processes → 1, or DDP). Processes write into a
temporary directory (`.step-NNNNNNN.tmp-<PID of rank 0>`) that rank 0 renames once all wrote, or deletes when the
write fails (a full disk), so no partial checkpoint is ever taken for one; what a killed run leaves is deleted by the
next stage (llmpipe.atomic.remove_orphaned_temporaries).

Checkpoints live outside the DVC outputs, in `<repo>/checkpoints/<stage>/<key>/`; `key` hashes the params
that change the arithmetic and the input hashes, so a changed param starts fresh, a rerun resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from llmpipe import atomic
from llmpipe.config import layout
from llmpipe.errors import InputDataError
from llmpipe.model.weights import read_checked_tensors

STEP_DIR = re.compile(r"^step-(\d{7})$")
FORMAT = "llmpipe dcp-safetensors 1"   # state.json "format": the layout above
SHARDS = "sharded"
# Keys of a training section that do not change the arithmetic: a checkpoint written under one value
# resumes under another (the data order and the gradients are the same for any number of processes and any
# split of the global batch into micro-batches).
RUNTIME_KEYS = frozenset({"processes", "nodes", "parallelism", "device", "log_every", "micro_batch_sequences"})
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def checkpoint_key(params: dict, inputs: dict[str, str]) -> str:
    """Hash of the declared params (dotted keys) and input hashes, without the `RUNTIME_KEYS` of a section."""
    kept = {key: value for key, value in params.items()
            if not ("." in key and key.split(".", 1)[1] in RUNTIME_KEYS)}
    blob = json.dumps({"params": kept, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _single_process_quiet():
    """Without a process group DCP warns that it assumes one process, which is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor file goes through here: safetensors only, float32 and finite (read_checked_tensors),
    one clear line when unreadable."""
    try:
        return read_checked_tensors(path)
    except InputDataError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise InputDataError(f"{path}: unreadable checkpoint file ({reason}); delete the checkpoint directory "
                             f"{path.parent} to start over") from None


def _check_shards(path: Path) -> None:
    """The shard files are safetensors (their headers readable); else one line naming the file."""
    shards = sorted((path / SHARDS).glob("*.safetensors"))
    if not shards:
        raise InputDataError(f"{path / SHARDS}: unreadable checkpoint (no shard files); delete {path} to start over")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                handle.keys()
        except (OSError, SafetensorError, ValueError) as exc:
            raise InputDataError(f"{shard}: unreadable checkpoint file ({exc}); delete the checkpoint directory "
                                 f"{path} to start over".splitlines()[0]) from None


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name → the name it is tied to (the tied output head → embed_tokens.weight)."""
    first: dict[int, str] = {}
    tied = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return tied


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """(model state, flat optimizer state, the tensors DCP saves or loads in place). The tensors are
    DTensors under FSDP (each process its shard), plain tensors otherwise; tied weights go in once; frozen
    weights stay out (LoRA's base, NF4 under QLoRA: they are the input model's, which the key pins), and so do
    the optimizer's hyperparameters (they come from the settings, which are in the key)."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=FLAT)
    left_out = set(_tied_names(model)) | {name.replace("_orig_mod.", "") for name, parameter
                                          in model.named_parameters() if not parameter.requires_grad}
    tensors = {"model": {k: v for k, v in model_state.items() if k not in left_out},
               "optimizer": {k: v for k, v in optimizer_state.items()
                             if k.startswith("state.") and isinstance(v, torch.Tensor)}}
    return model_state, optimizer_state, tensors


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

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Write `step-NNNNNNN/` (every process calls this; each writes its own shard)."""
        path = self.directory / f"step-{step:07d}"
        if _rank() == 0:
            atomic.remove_stale_temporaries(path)
            temp = atomic.temp_sibling(path)  # rank 0's PID in its name: what a killed run left is told apart
            (temp / SHARDS).mkdir(parents=True)
        _barrier()
        if _rank() != 0:
            temp = atomic.temporaries_of(path)[0]  # the one rank 0 made
        try:
            tensors = _dcp_state(model, optimizer)[2]
            with _single_process_quiet():
                dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(temp / SHARDS),
                                                                              save_distributed=True),
                         no_dist=not dist.is_initialized())
            _barrier()  # every process has written its shard
            if _rank() == 0:
                save_file({"torch": torch.get_rng_state()}, str(temp / "rng.safetensors"))
                world = dist.get_world_size() if dist.is_initialized() else 1
                (temp / "state.json").write_text(atomic.json_text({**state, "step": step, "format": FORMAT,
                                                                   "processes": world}, indent=1), encoding="utf-8")
                atomic.publish(temp, path)
        except BaseException:  # a full disk, a signal: no half-written checkpoint stays behind
            if _rank() == 0:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        if _rank() == 0:
            for old in self.steps()[:-self.keep]:
                shutil.rmtree(self.directory / f"step-{old:07d}", ignore_errors=True)
        _barrier()
        return path

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore weights, optimizer and RNG from `path` (every process calls this); returns state.json."""
        try:
            state = json.loads((path / "state.json").read_text("utf-8"))
            history = state["history"]
            if state.get("format") != FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {FORMAT!r} (an older layout?)")
            if not (isinstance(state["step"], int)
                    and all(isinstance(history[kind], list) and all(isinstance(row, dict) for row in history[kind])
                            for kind in ("train", "eval"))):
                raise ValueError("state.json does not hold step and history as the loop writes them")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputDataError(f"{path}: unreadable checkpoint ({exc}); delete it to start over".splitlines()[0]) from None
        rng = _read_tensors(path / "rng.safetensors").get("torch")
        _check_shards(path)
        model_state, optimizer_state, tensors = _dcp_state(model, optimizer)
        try:
            with _single_process_quiet():
                dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDS)),
                         no_dist=not dist.is_initialized())
            for name, target in _tied_names(model).items():
                model_state[name] = model_state[target]
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=FLAT)
        except (KeyError, ValueError, RuntimeError, AssertionError, dcp.api.CheckpointException) as exc:
            raise InputDataError(f"{path}: the checkpoint does not match the model and optimizer ({exc}); "
                                 "delete it to start over".splitlines()[0]) from None
        if rng is None:
            raise InputDataError(f"{path / 'rng.safetensors'}: no \"torch\" tensor; delete the checkpoint to start over")
        torch.set_rng_state(rng)
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
