"""Several nodes: two elastic agents on 127.0.0.1 (one process each, gloo) form one pretraining job
through torchrun's c10d rendezvous, one under `dvc repro` (the head node), one started by hand as a
cluster launcher would on the second node."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from harness import dvc, edit_params, environment, runs_the_pipeline

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def second_node(repo, endpoint: str, log) -> subprocess.Popen:
    """The other node's agent: the stage's command line from dvc.yaml, in its own process group."""
    command = [sys.executable, "-m", "llmpipe.runner.launch", "--nodes", "2", "--processes", "1", "stages/pretrain.py"]
    return subprocess.Popen(command, cwd=repo, env=environment(PET_RDZV_ENDPOINT=endpoint), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def lose_node(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and its training processes (which the agent starts in sessions of their own)."""
    import psutil

    processes = psutil.Process(agent.pid).children(recursive=True)
    for process in processes:
        process.send_signal(signal.SIGKILL)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    psutil.wait_procs(processes, timeout=10)


def stage_errors_or_stacks(head: subprocess.Popen, seconds: float) -> str:
    """The head's stderr once `dvc repro` ends; if it has not ended within `seconds`, the stacks of its stage
    processes (SIGUSR1: llmpipe.runner.guard) in the failure, and the whole tree stopped."""
    import psutil

    try:
        return head.communicate(timeout=seconds)[1]
    except subprocess.TimeoutExpired:
        processes = psutil.Process(head.pid).children(recursive=True)
        for process in processes:
            with contextlib.suppress(psutil.Error):
                if runs_the_pipeline(process.cmdline()):  # a stage or the launcher (DVC runs as `python .../dvc`)
                    process.send_signal(signal.SIGUSR1)
        time.sleep(5)
        for process in [*processes, psutil.Process(head.pid)]:
            with contextlib.suppress(psutil.Error):
                process.kill()
        errors = head.communicate()[1]
        pytest.fail(f"dvc repro went on {seconds:.0f} s after a node was lost; its stages' stacks:\n{errors[-20000:]}")


def wait_for_rendezvous_host(endpoint: str) -> None:
    host, port = endpoint.split(":")
    deadline = time.time() + 120
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens at {endpoint}")


def train_losses(repo) -> list[float]:
    lines = (repo / "reports/pretrain/train_curve.csv").read_text().splitlines()
    column = lines[0].split(",").index("train_loss")
    return [float(line.split(",")[column]) for line in lines[1:]]


def test_two_nodes_form_one_job_with_the_one_process_loss_curve(copy_built, built_repo, tmp_path):
    repo = copy_built()
    edit_params(repo, pretrain__nodes=2)
    endpoint = f"127.0.0.1:{free_port()}"
    with open(tmp_path / "second_node.log", "w") as log:
        other = second_node(repo, endpoint, log)
        head = dvc(repo, "repro", "pretrain", check=False, PET_RDZV_ENDPOINT=endpoint)
        assert other.wait(timeout=120) == 0, (tmp_path / "second_node.log").read_text()[-3000:]
    assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
    assert "2 process(es)" in head.stdout + (tmp_path / "second_node.log").read_text()
    assert train_losses(repo) == pytest.approx(train_losses(built_repo), rel=1e-4)


def test_losing_a_node_stops_the_job_with_one_line_and_the_next_run_resumes(copy_built, tmp_path):
    repo = copy_built()
    edit_params(repo, pretrain__nodes=2, pretrain__max_steps=40, pretrain__eval_every=20)
    endpoint = f"127.0.0.1:{free_port()}"
    with open(tmp_path / "second_node.log", "w") as log:
        head = subprocess.Popen([str(os.path.join(os.path.dirname(sys.executable), "dvc")), "repro", "pretrain"],
                                cwd=repo, env=environment(PET_RDZV_ENDPOINT=endpoint), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for_rendezvous_host(endpoint)  # the head node hosts the rendezvous, as on a cluster
        other = second_node(repo, endpoint, log)
        deadline = time.time() + 180
        while not list((repo / "checkpoints/pretrain").glob("*/step-*")) and time.time() < deadline:
            time.sleep(0.01)
        lose_node(other)
        errors = stage_errors_or_stacks(head, 300)
    assert head.returncode != 0
    last_line = errors.strip().splitlines()[-2]  # DVC's own "failed to reproduce" line comes last
    assert last_line.startswith("error: stages/pretrain.py failed") and "or another node was lost" in last_line, errors[-3000:]

    with open(tmp_path / "second_node_again.log", "w") as log:
        other = second_node(repo, endpoint, log)
        again = dvc(repo, "repro", "pretrain", check=False, PET_RDZV_ENDPOINT=endpoint)
        assert other.wait(timeout=120) == 0, (tmp_path / "second_node_again.log").read_text()[-3000:]
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    output = again.stdout + (tmp_path / "second_node_again.log").read_text()
    assert "resuming from checkpoint" in output
    assert len(train_losses(repo)) == 40
