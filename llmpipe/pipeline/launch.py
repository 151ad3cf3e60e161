"""Run a stage script in N data-parallel processes per node, on one node or several, as `torchrun` does.

    python -m llmpipe.pipeline.launch --processes N stages/pretrain.py [hydra overrides]
    PET_RDZV_ENDPOINT=head-node:29400 python -m llmpipe.pipeline.launch --nodes M --processes N stages/pretrain.py

One node: with N = 1 the script runs in this process (no launcher overhead); with N > 1 it goes through
torch.distributed's elastic launcher (what `torchrun --standalone` runs) on a free local port.

Several nodes: this command runs once on every node (one elastic agent per node, each starting N
processes); the agents meet through torchrun's c10d rendezvous at an endpoint every node can reach,
a `host:port` on one of them (`--rdzv-endpoint`, or PET_RDZV_ENDPOINT as torchrun reads it), under a
run id shared by the job's agents (`--rdzv-id` or PET_RDZV_ID; on SLURM, the job id). On the head
node DVC runs it as the stage command (`dvc repro`); on the others a launcher such as `srun` runs the
same line. The repository must be on a file system all nodes share: global rank 0 writes the outputs
and checkpoints, and the rendezvous may place it on any node.

A failed process, or a lost node, ends the launch with that process's exit status and a one-line
error instead of the launcher's multi-screen report; the stage's next run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import uuid
from pathlib import Path

JOIN_TIMEOUT_SECONDS = 900  # how long the first agent waits for the others (the head may still be on earlier stages)


def rendezvous(nodes: int, endpoint: str | None, run_id: str | None, script: str) -> tuple[str, str]:
    """The rendezvous endpoint and run id: a free local port for one node; given ones for several."""
    if nodes == 1:
        return "localhost:0", run_id or str(uuid.uuid4())
    if not endpoint:
        raise SystemExit(f"error: --nodes {nodes} needs the rendezvous endpoint every node can reach: "
                         "--rdzv-endpoint HOST:PORT or PET_RDZV_ENDPOINT=HOST:PORT (e.g. the first node's "
                         "hostname and a free port, the same on all nodes)")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"error: rendezvous endpoint {endpoint!r}: expected HOST:PORT, e.g. node001:29400")
    return endpoint, run_id or f"llmpipe-{Path(script).stem}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.pipeline.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=1, help="processes per node (torchrun --nproc-per-node)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the job, one agent each (torchrun --nnodes)")
    parser.add_argument("--rdzv-endpoint", default=os.environ.get("PET_RDZV_ENDPOINT"),
                        help="HOST:PORT of the c10d rendezvous, the same on every node (default: $PET_RDZV_ENDPOINT)")
    parser.add_argument("--rdzv-id", default=os.environ.get("PET_RDZV_ID"),
                        help="run id shared by the job's agents (default: $PET_RDZV_ID, else llmpipe-<script>)")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    for name in ("processes", "nodes"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            sys.exit(2)
    if args.processes == 1 and args.nodes == 1:
        sys.argv = [args.script, *args.script_args]
        runpy.run_path(args.script, run_name="__main__")
        return

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousError,
        RendezvousTimeoutError,
    )
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    endpoint, run_id = rendezvous(args.nodes, args.rdzv_endpoint, args.rdzv_id, args.script)
    config = LaunchConfig(min_nodes=args.nodes, max_nodes=args.nodes, nproc_per_node=args.processes, run_id=run_id,
                          rdzv_backend="c10d", rdzv_endpoint=endpoint, max_restarts=0, monitor_interval=0.5,
                          rdzv_configs={"join_timeout": JOIN_TIMEOUT_SECONDS})
    job = f"{args.nodes} node(s) × {args.processes} process(es)"
    try:
        elastic_launch(config, entrypoint=sys.executable)(args.script, *args.script_args)
    except ChildFailedError as failure:
        exit_code = next(iter(failure.failures.values())).exitcode
        lost_node = " or another node was lost" if args.nodes > 1 else ""
        print(f"error: {args.script} failed in {len(failure.failures)} of this node's {args.processes} process(es) "
              f"of {job} (exit status {exit_code}){lost_node}; see the process output above; the next run resumes "
              f"from the last checkpoint", file=sys.stderr)
        sys.exit(exit_code if exit_code > 0 else 1)
    except RendezvousTimeoutError:
        print(f"error: {args.script}: the {job} did not form at {endpoint} (run id {run_id}) within "
              f"{JOIN_TIMEOUT_SECONDS} s; start the same command on every node", file=sys.stderr)
        sys.exit(1)
    except RendezvousError as exc:  # e.g. the node hosting the rendezvous store stopped
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {args.script}: the {job} lost its rendezvous at {endpoint} (run id {run_id}): {reason} "
              "If a node stopped, start the stage again on every node: it resumes from the last checkpoint",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
