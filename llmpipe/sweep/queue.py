"""Run one DVC experiment per seed through DVC's queue and wait for them.

Experiments are queued with `dvc exp run --queue -n <sweep>-seed<N> -S seed=N ...` and run by
`dvc queue start` workers; their states come from DVC's Python API (`celery_queue.status()`, what
`dvc queue status` prints), never from the text of that command.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass

from llmpipe.errors import PipelineError
from llmpipe.sweep.summary import experiment_name

ACTIVE = ("Queued", "Running")  # states of a task not finished yet


@dataclass(frozen=True)
class QueueTask:
    rev: str            # the task's stash revision: unique, unlike its name
    name: str | None    # the experiment name (`-n`)
    status: str         # Queued, Running, Success, Failed, ...


def queue_tasks() -> list[QueueTask]:
    """Every task DVC's experiment queue knows, as `dvc queue status` lists them."""
    from dvc.repo import (
        Repo,  # deferred: dvc takes ~0.2 s to import; `llmpipe --help` starts without it
    )

    with Repo(".") as repo:
        return [QueueTask(task["rev"], task.get("name"), task["status"]) for task in repo.experiments.celery_queue.status()]


def queue_states(tasks: list[QueueTask], earlier_tasks: Collection[str] = ()) -> dict[str, str]:
    """Each task's state by experiment name, leaving out the tasks in `earlier_tasks` (revs taken before queueing):
    a name can also have a task from an earlier sweep of that name."""
    return {task.name: task.status for task in tasks if task.rev not in earlier_tasks and task.name}


def queue_progress(tasks: list[QueueTask], names: list[str], earlier_tasks: Collection[str] = ()) -> tuple[list[str], bool]:
    """Which of `names` are still queued or running, and whether the queue is stalled: tasks queued and none
    running (a worker can die, e.g. after `dvc queue kill`, leaving queued tasks that never start)."""
    states = queue_states(tasks, earlier_tasks)
    pending = [name for name in names if states.get(name) in ACTIVE]
    every_state = {task.status for task in tasks}
    return pending, "Queued" in every_state and "Running" not in every_state


def dvc(*args: str) -> str:
    """Run a DVC command; its failure is a one-line PipelineError."""
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {last[0] if last else result.returncode}")
    return result.stdout


def exp_show(all_commits: bool = False) -> list:
    """`dvc exp show --json`: the experiments on HEAD (DVC lists experiments under the commit they started
    from), or on every commit, for a sweep queued before a later commit."""
    return json.loads(dvc("exp", "show", "--json", *(["--all-commits"] if all_commits else [])))


def start_queue(jobs: int) -> None:
    """Start `jobs` queue workers. Each experiment runs in its own copy of the repository; "." first on the path
    makes its stages import that copy's llmpipe, not the workspace an editable install points at. Workers
    already running keep their environment (`dvc queue stop` them first)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")]))}
    # The workers outlive `dvc queue start` and keep its output open: do not wait on it.
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)


def queue_seeds(sweep: str, seeds: list[int], overrides: list[str], targets: list[str]) -> list[str]:
    """Queue one experiment per seed (`-S seed=N` plus the overrides); returns their names."""
    names = []
    for seed in seeds:
        name = experiment_name(sweep, seed)
        dvc("exp", "run", "--queue", "-n", name, "-S", f"seed={seed}",
            *[item for override in overrides for item in ("-S", override)], *targets)
        names.append(name)
    return names


def wait_for_queue(names: list[str], jobs: int, poll_seconds: float, earlier_tasks: set[str]) -> list[QueueTask]:
    """Until none of `names` (not counting `earlier_tasks`) is queued or running (other sweeps' tasks may still
    be); restarts the workers if the queue stalls while some of ours still wait. Stalled means twice in a row,
    `poll_seconds` apart: a worker takes a moment to pick up the next task."""
    stalled_before = False
    while True:
        time.sleep(poll_seconds)
        tasks = queue_tasks()
        pending, stalled = queue_progress(tasks, names, earlier_tasks)
        if not pending:
            return tasks
        if stalled and stalled_before:
            print(f"sweep: nothing running with {len(pending)} experiment(s) waiting; starting {jobs} queue worker(s)",
                  flush=True)
            start_queue(jobs)
            stalled = False
        stalled_before = stalled
