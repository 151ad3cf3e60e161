"""MLflow runs whose process is gone: a stage killed by SIGKILL (or out of memory, or a power cut) cannot end its
run, nor its pipeline run, which would stay RUNNING for ever.

Every run records the process that holds it RUNNING (`process_tags`: host, PID and the process's start time, so
a PID reused by a later process is not taken for it); a pipeline run, which each of its stages sets RUNNING in
turn, records the stage process of the moment. When a stage starts, `close_orphaned_runs` ends as FAILED every
RUNNING run of the experiment whose process, on this machine, is gone, with tag `llmpipe.end_reason` saying so.
Runs of other machines are left alone (their processes cannot be seen from here).
"""

from __future__ import annotations

import os
import socket
import sys
import time

NOT_A_STAGE_DEPENDENCY = "closes the MLflow runs of killed processes"  # see llmpipe.generate.code_deps

HOST_TAG, PID_TAG, STARTED_TAG = "llmpipe.host", "llmpipe.pid", "llmpipe.process_started"
REASON_TAG = "llmpipe.end_reason"


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # there, but not readable (another user's): alive
        return -1.0


def process_tags() -> dict[str, str]:
    """The tags naming this process: host, PID, start time."""
    started = _started(os.getpid())
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            STARTED_TAG: f"{started:.2f}" if started and started > 0 else ""}


def set_process_tags(client, run_id: str) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in process_tags().items()])


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process the tags name is known to have ended: on this machine, and no process has that PID, or
    the one that has it started at another time."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    started = _started(int(tags[PID_TAG]))
    if started is None:
        return True
    try:
        recorded = float(tags.get(STARTED_TAG) or "nan")
    except ValueError:
        return False
    return started > 0 and abs(started - recorded) > 1.0


def close_orphaned_runs(client, experiment_id: str, stage: str) -> list[str]:
    """End as FAILED every RUNNING run of the experiment whose process is gone; returns their names."""
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        if not process_gone(run.data.tags):
            continue
        current = client.get_run(run.info.run_id)  # it may have moved on since the search (a pipeline's next stage)
        if current.info.status != "RUNNING" or not process_gone(current.data.tags):
            continue
        tags = current.data.tags
        client.set_tag(run.info.run_id, REASON_TAG,
                       f"its process (PID {tags[PID_TAG]} on {tags[HOST_TAG]}) ended without closing the run (killed: "
                       f"SIGKILL, out of memory, a power cut); closed when stage {stage} started, "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        client.set_terminated(run.info.run_id, "FAILED")
        closed.append(current.info.run_name or run.info.run_id)
    if closed:
        print(f"MLflow: {len(closed)} run(s) left RUNNING by a process that is gone now marked FAILED: "
              f"{', '.join(closed)}", file=sys.stderr, flush=True)
    return closed
