"""The end-to-end test harness: a temporary copy of the repository configured tiny, the commands that run the
pipeline in it (DVC, a stage script, the `llmpipe` command) and readers of what the pipeline left there.

The copy holds the committed files (git ls-files), a fresh git repository, conf/ overridden with the TINY values
below and params.yaml composed from it, so `dvc repro` and `dvc exp run -S` both work there in seconds. MLflow
writes to the copy's own .mlflow/ (the default store), never to the user's. conftest.py builds one such copy per
session (the `built_repo` fixture) and marks every test that runs the pipeline slow.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

STAGES = ["prepare", "train_tokenizer", "tokenize", "pretrain", "finetune", "quantize", "evaluate"]
OUTPUT_FILES = ["data/prepared/pretrain_train.jsonl", "data/prepared/qa_heldout_people.jsonl",
                "models/tokenizer/tokenizer.json", "data/tokens/train/shard-00000.bin",
                "data/tokens/validation/shard-00000.bin",
                "data/tokens/meta.json", "models/pretrained/model.safetensors", "models/finetuned/model.safetensors"]

TINY = {
    "data": {"world": {"num_people": 12, "paraphrases": 2}},
    "tokenizer": {"vocab_size": 300},
    "tokenize": {"num_proc": 1},
    "model": {"context_length": 32, "n_layer": 1, "d_model": 256, "n_head": 2, "n_kv_head": 1, "ffn_hidden": 256},
    "pretrain": {"max_steps": 6, "global_batch_sequences": 4, "micro_batch_sequences": 2, "warmup_steps": 2,
                 "eval_every": 3, "log_every": 1, "checkpoint_every": 2, "eval_max_tokens": 512,
                 "peak_flops_per_second": 1.0e11,
                 "precision": "fp32"},  # not auto (the default): the same results on CPUs with and without bf16
    # LoRA here (the default is chat_tokens): the adapter, its merge and its sharding get tested too;
    # test_finetune_only_change_reruns_finetune_and_downstream_only switches to full.
    "finetune": {"method": "lora", "learning_rate": 3.0e-3, "max_steps": 4, "global_batch_sequences": 4,
                 "micro_batch_sequences": 2, "warmup_steps": 1, "eval_every": 2, "log_every": 1, "checkpoint_every": 2,
                 "max_new_tokens": 6, "sample_answers": 2},
    "evaluate": {"eval_max_tokens": 512, "kl_max_tokens": 256, "max_questions_per_split": 10, "max_new_tokens": 6,
                 "generation_tokens": 8, "sample_answers": 2},
}


def skip_outside_ci(reason: str) -> None:
    """Skip a test whose reference (a library, a server program) is absent, printing `reason`; under CI (CI=true)
    fail instead: .ci/run installs every reference, so there the test must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; under CI these tests must run (.ci/run installs what they need)")
    print(f"skipped: {reason}")
    pytest.skip(reason)


def runs_the_pipeline(command) -> bool:
    """Whether a process started with `command` runs DVC, a stage script or the multi-process launcher: what
    makes a test slow (conftest.py refuses it in a test not marked slow)."""
    words = [os.fsdecode(word) for word in ([command] if isinstance(command, (str, bytes, os.PathLike)) else command)]
    return bool(words) and (Path(words[0]).name == "dvc" or any(
        word.startswith("stages/") or word == "llmpipe.runner.launch" for word in words))


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def environment(**extra: str) -> dict:
    """This process's environment without the user's MLflow, DVC and llmpipe settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "LLMPIPE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(command: list[str], cwd: Path, check: bool = True, timeout: int = 600,
        **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                             f"\n--- stderr\n{result.stderr[-4000:]}")
    return result


def dvc(repo: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], repo, check=check, **env)


def make_repo_copy(destination: Path, overrides: dict = TINY) -> Path:
    """Copy the committed files of the repository to `destination` and configure them tiny."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    config_path = destination / "conf" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config_path.write_text(yaml.safe_dump(deep_merge(config, overrides), sort_keys=False))
    for name in ("dvc.lock",):
        (destination / name).unlink(missing_ok=True)
    run([str(BIN / "llmpipe"), "compose", "--params-only"], destination)
    run(["git", "init", "-q"], destination)
    run(["git", "config", "user.name", "llmpipe test"], destination)
    run(["git", "config", "user.email", "test@llmpipe.invalid"], destination)
    run(["git", "add", "-A"], destination)
    run(["git", "commit", "-qm", "tiny configuration"], destination)
    return destination


def kill_at_first_checkpoint(repo: Path, stage: str) -> None:
    """Start stages/<stage>.py, SIGKILL it as soon as its first checkpoint exists."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, f"stages/{stage}.py"], cwd=repo, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((repo / "checkpoints" / stage).glob("*/step-*")) and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the stage finished before it could be killed"


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to a server started with `start_new_session=True` and the processes it started, SIGKILL after
    `timeout` seconds."""
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, seconds: float, what: str) -> None:
    """Call `check` until it returns true (an OSError counts as not yet), failing with `what` after `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} within {seconds:.0f} s")


def edit_params(repo: Path, **changes) -> None:
    """Set keys in params.yaml, as a user editing the file would (`pretrain__max_steps=4` is pretrain.max_steps)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


ALWAYS_RUN = ("check_inputs", "log_pipeline")  # dvc.yaml's `always_changed` stages: DVC runs them every time


def pipeline_status(repo: Path) -> str:
    """`dvc status` without check_inputs and log_pipeline, which DVC runs every time (`always changed`): "" when up
    to date."""
    status = dvc(repo, "status").stdout
    for stage in ALWAYS_RUN:
        status = status.replace(f"{stage}:\n\talways changed", "")
    return status.strip()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def ran(output: str) -> list[str]:
    """The stages a DVC command's output says it ran, in pipeline order."""
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def mlflow_runs(repo: Path):
    """(an MLflow client on the copy's store, every run of the llmpipe experiment)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{repo / '.mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmpipe")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)
