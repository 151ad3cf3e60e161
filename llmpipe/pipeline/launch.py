"""Run a stage script in N data-parallel processes, as `torchrun --standalone` does.

    python -m llmpipe.pipeline.launch --processes N stages/pretrain.py [hydra overrides]

With N = 1 the script runs in this process (no launcher overhead). With N > 1 it goes through
torch.distributed's elastic launcher (what `torchrun` runs) on a free local port, and a failed process
ends the launch with that process's exit status and its own one-line error, without the launcher's
multi-screen report.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import uuid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.pipeline.launch", description=__doc__.split("\n")[1])
    parser.add_argument("--processes", type=int, default=1, help="processes on this machine (torchrun --nproc_per_node)")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.processes < 1:
        print(f"error: --processes must be at least 1, got {args.processes}", file=sys.stderr)
        sys.exit(2)
    if args.processes == 1:
        sys.argv = [args.script, *args.script_args]
        runpy.run_path(args.script, run_name="__main__")
        return

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, entrypoint=sys.executable)(args.script, *args.script_args)
    except ChildFailedError as failure:
        exit_code = next(iter(failure.failures.values())).exitcode
        print(f"error: {args.script} failed in {len(failure.failures)} of {args.processes} processes "
              f"(exit status {exit_code}); see the process output above", file=sys.stderr)
        sys.exit(exit_code if exit_code > 0 else 1)


if __name__ == "__main__":
    main()
