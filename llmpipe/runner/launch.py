"""Run a stage script in N data-parallel processes per node, on one node or several, as `torchrun` does.

    python -m llmpipe.runner.launch --processes N stages/pretrain.py [hydra overrides]
    PET_RDZV_ENDPOINT=head-node:29400 python -m llmpipe.runner.launch --nodes M --processes N stages/pretrain.py

One node: with N = 1 the script runs in this process (no launcher overhead); with N > 1 it goes through
torch.distributed's elastic launcher (what `torchrun --standalone` runs) on a free local port.

Several nodes: this command runs once on every node (one elastic agent per node, each starting N
processes); the agents meet through torchrun's c10d rendezvous at an endpoint every node can reach,
a `host:port` on one of them (`--rdzv-endpoint`, or PET_RDZV_ENDPOINT as torchrun reads it), under a
run id shared by the job's agents (`--rdzv-id` or PET_RDZV_ID; on SLURM, the job id). On the head
node DVC runs it as the stage command (`dvc repro`); on the others a launcher such as `srun` runs the
same line. The repository must be on a file system all nodes share: global rank 0 writes the outputs
and checkpoints, and the rendezvous may place it on any node.

A failed process, or a lost node, ends the launch with that process's exit status and one line (the one the
failed process left: llmpipe.runner.guard) instead of the launcher's multi-screen report; the stage's next
run resumes from its last checkpoint. The launcher runs under the same guard as the stages: whatever ends it,
its own argument checks included, the stage's previous outputs are put back once every process has ended.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
import tempfile
import uuid
from pathlib import Path

from llmpipe.config.params import PARAMS_FILE
from llmpipe.errors import PipelineError, Stopped
from llmpipe.runner.guard import (
    ERRORS_DIR,
    collected_error,
    guarded,
    put_back,
)

NOT_A_STAGE_DEPENDENCY = "process launch (torchrun)"  # see llmpipe.generate.code_deps

JOIN_TIMEOUT_SECONDS = 900  # how long the first agent waits for the others (the head may still be on earlier stages)


def rendezvous(nodes: int, endpoint: str | None, run_id: str | None, script: str) -> tuple[str, str]:
    """The rendezvous endpoint and run id: a free local port for one node; given ones for several."""
    if nodes == 1:
        return "localhost:0", run_id or str(uuid.uuid4())
    if not endpoint:
        raise PipelineError(f"--nodes {nodes} needs the rendezvous endpoint every node can reach: "
                            "--rdzv-endpoint HOST:PORT or PET_RDZV_ENDPOINT=HOST:PORT (e.g. the first node's "
                            "hostname and a free port, the same on all nodes)")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"rendezvous endpoint {endpoint!r}: expected HOST:PORT, e.g. node001:29400")
    return endpoint, run_id or f"llmpipe-{Path(script).stem}"


def count_option(args: argparse.Namespace, name: str, stage: str | None) -> int:
    """--processes / --nodes as a positive integer. Under DVC they come from the stage's params (dvc.yaml's cmd
    passes `${pretrain.processes}`), so a bad value is named as that params key."""
    value = getattr(args, name)
    if value.isdigit() and int(value) >= 1:
        return int(value)
    where = f"{PARAMS_FILE}: {stage}.{name}" if stage else f"--{name}"
    raise PipelineError(f"{where}: expected an integer >= 1, got {value!r}")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.runner.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="1", help="processes per node (torchrun --nproc-per-node)")
    parser.add_argument("--nodes", default="1", help="nodes of the job, one agent each (torchrun --nnodes)")
    parser.add_argument("--rdzv-endpoint", default=os.environ.get("PET_RDZV_ENDPOINT"),
                        help="HOST:PORT of the c10d rendezvous, the same on every node (default: $PET_RDZV_ENDPOINT)")
    parser.add_argument("--rdzv-id", default=os.environ.get("PET_RDZV_ID"),
                        help="run id shared by the job's agents (default: $PET_RDZV_ID, else llmpipe-<script>)")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    stage = os.environ.get("DVC_STAGE")  # the stage DVC runs this command for; by hand, none
    with guarded(stage or Path(args.script).stem):  # the stage's name under DVC; by hand, the script's
        processes, nodes = count_option(args, "processes", stage), count_option(args, "nodes", stage)
        if processes == 1 and nodes == 1:
            sys.argv = [args.script, *args.script_args]
            runpy.run_path(args.script, run_name="__main__")
            return
        launch(args, processes, nodes, stage or Path(args.script).stem)


def launch(args: argparse.Namespace, processes: int, nodes: int, stage: str) -> None:
    """Run the script in `processes` processes on each of `nodes` nodes; a failure is one line and exit status,
    the line a failed process left (llmpipe.runner.guard) when there is one."""
    # deferred: torch's elastic launcher takes ~1.2 s to import (torch included); one process (the default) runs
    # the script in this process without it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousError,
        RendezvousTimeoutError,
    )
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in [name for name in logging.root.manager.loggerDict if name.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its own lines about stopping processes: ours say it
    endpoint, run_id = rendezvous(nodes, args.rdzv_endpoint, args.rdzv_id, args.script)
    config = LaunchConfig(min_nodes=nodes, max_nodes=nodes, nproc_per_node=processes, run_id=run_id,
                          rdzv_backend="c10d", rdzv_endpoint=endpoint, max_restarts=0, monitor_interval=0.5,
                          rdzv_configs={"join_timeout": JOIN_TIMEOUT_SECONDS})
    job = f"{nodes} node(s) × {processes} process(es)"
    with tempfile.TemporaryDirectory(prefix="llmpipe-errors-") as errors:
        os.environ[ERRORS_DIR] = errors
        try:
            elastic_launch(config, entrypoint=sys.executable)(args.script, *args.script_args)
        except ChildFailedError as failure:
            exit_code = next(iter(failure.failures.values())).exitcode
            kind, message = collected_error(errors) or ("", "")
            if kind != "refused":  # a crash, a signal, or no process said why (killed, out of memory, a node lost)
                lost_node = " or another node was lost" if nodes > 1 else ""
                cause = f": {message}" if message else "; see the process output above"
                message = (f"{args.script} failed in {len(failure.failures)} of this node's {processes} process(es) "
                           f"of {job} (exit status {exit_code}){lost_node}{cause}; the next run resumes from the last "
                           "checkpoint")
            put_back(stage, is_main=True)  # every process has ended: now, before the line that ends the output
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(exit_code if exit_code > 0 else 1)
        except SignalException as exc:  # the launcher was sent SIGTERM (or Ctrl-C): its processes are stopped
            raise Stopped(int(exc.sigval)) from None
        except RendezvousTimeoutError:
            raise PipelineError(f"{args.script}: the {job} did not form at {endpoint} (run id {run_id}) within "
                                f"{JOIN_TIMEOUT_SECONDS} s; start the same command on every node") from None
        except RendezvousError as exc:  # e.g. the node hosting the rendezvous store stopped
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PipelineError(f"{args.script}: the {job} lost its rendezvous at {endpoint} (run id {run_id}): "
                                f"{reason} If a node stopped, start the stage again on every node: it resumes from "
                                "the last checkpoint") from None


if __name__ == "__main__":
    main()
