"""FSDP2 (`pretrain.parallelism: fsdp`) on CPU with gloo, 2 processes, through the real stages in a tiny copy:
the loss curve equals the single-process one (which the DDP test equals too), a killed 2-process run resumes
with 1 process from its sharded checkpoint and continues the curve, and LoRA fine-tuning under FSDP writes a
merged model that loads and matches the single-process one."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from harness import dvc, edit_params, environment

pytestmark = pytest.mark.slow

REL = 1e-4  # as test_two_process_ddp_matches_one_process: summation order differs, nothing else


def curve(root: Path, stage: str, column: str = "train_loss") -> list[float]:
    lines = (root / f"reports/{stage}/train_curve.csv").read_text().splitlines()
    index = lines[0].split(",").index(column)
    return [float(line.split(",")[index]) for line in lines[1:]]


def kill_all_at_first_checkpoint(repo: Path, stage: str, processes: int) -> None:
    """Launch stages/<stage>.py in `processes` processes (llmpipe.runner.launch, torch's elastic launcher)
    and SIGKILL the launcher and every worker as soon as the first checkpoint exists. The workers run in
    sessions of their own (the elastic launcher starts them so), so killing the launcher's process group
    would leave them running: each process is killed by its id."""
    launcher = subprocess.Popen([sys.executable, "-m", "llmpipe.runner.launch", "--processes", str(processes),
                                 f"stages/{stage}.py"], cwd=repo, env=environment(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list((repo / "checkpoints" / stage).glob("*/step-*")) and time.time() < deadline:
        time.sleep(0.01)
    family = [launcher.pid] + [child.pid for child in psutil.Process(launcher.pid).children(recursive=True)]
    for pid in family:
        try:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    assert launcher.wait() == -signal.SIGKILL, "the stage finished before it could be killed"
    psutil.wait_procs([p for p in map(_process, family[1:]) if p], timeout=10)


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_fsdp_two_processes_match_one_process(copy_built, built_repo):
    repo = copy_built()
    edit_params(repo, pretrain__processes=2, pretrain__parallelism="fsdp")
    output = dvc(repo, "repro", "pretrain").stdout
    assert "2 process(es) (FSDP2, sharded)" in output
    single, sharded = curve(built_repo, "pretrain"), curve(repo, "pretrain")
    assert len(single) == len(sharded) == 6
    assert sharded == pytest.approx(single, rel=REL)
    # The output is the usual whole model: one safetensors file + config.json, same tensors.
    from safetensors.torch import load_file
    ours = load_file(str(repo / "models/pretrained/model.safetensors"))
    reference = load_file(str(built_repo / "models/pretrained/model.safetensors"))
    assert ours.keys() == reference.keys()
    assert all(torch.allclose(ours[k], reference[k], rtol=1e-3, atol=1e-5) for k in ours)


def test_killed_two_process_fsdp_run_resumes_with_one_process(copy_built, built_repo):
    repo = copy_built()
    edit_params(repo, pretrain__processes=2, pretrain__parallelism="fsdp")
    kill_all_at_first_checkpoint(repo, "pretrain", processes=2)
    checkpoint = sorted((repo / "checkpoints/pretrain").glob("*/step-*"))[0]
    assert '"processes": 2' in (checkpoint / "state.json").read_text()
    assert len(list((checkpoint / "sharded").glob("shard-*.safetensors"))) == 2   # one shard file per process

    edit_params(repo, pretrain__processes=1)  # the checkpoint key leaves processes out: same checkpoints
    output = dvc(repo, "repro", "pretrain").stdout
    assert "resuming from checkpoint" in output and "1 process(es)" in output
    assert curve(repo, "pretrain") == pytest.approx(curve(built_repo, "pretrain"), rel=REL)
    assert not list((repo / "checkpoints/pretrain").glob("*/step-*"))  # cleared after success


def test_lora_finetune_under_fsdp_writes_a_merged_model_that_loads(copy_built, built_repo):
    from llmpipe.model.weights import load_model

    repo = copy_built()
    edit_params(repo, finetune__processes=2, finetune__parallelism="fsdp")
    output = dvc(repo, "repro", "finetune").stdout
    assert "finetune: lora" in output and "(FSDP2, sharded)" in output
    assert curve(repo, "finetune") == pytest.approx(curve(built_repo, "finetune"), rel=REL)
    model, config = load_model(repo / "models/finetuned")
    reference, reference_config = load_model(built_repo / "models/finetuned")
    assert config["best_step"] == reference_config["best_step"]
    mine, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.allclose(mine[k], theirs[k], rtol=1e-3, atol=1e-5) for k in mine)
    assert (repo / "models/finetuned/adapter/adapter_model.safetensors").is_file()
