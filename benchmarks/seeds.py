"""Run the pipeline over several seeds and report each headline metric as mean / min / max.

One "sweep" is a set of DVC experiments named `<sweep>-seed<N>`, queued with `dvc exp run --queue`
(`-S seed=N` plus any overrides you give), run by `dvc queue start` and read back from `dvc exp show`.
The summary goes to reports/seeds/<sweep>.md and .json and to one MLflow run named `seeds <sweep>`
(tags: the experiments it covers). Experiments that already exist with metrics are not run again.

    python benchmarks/seeds.py run default --seeds 1 2 3 4 5
    python benchmarks/seeds.py run paraphrases-1 --seeds 1 2 3 4 5 -S data.world.paraphrases=1
    python benchmarks/seeds.py run no-mixing -S data.world.mixed_training=false --target finetune
    python benchmarks/seeds.py summary default                 # summarise experiments already run
    python benchmarks/seeds.py compare default paraphrases-1 paraphrases-20 \\
        --param data.world.paraphrases                         # one table, and a plot against the param

Run it from the repository root, with the pipeline's dependencies committed (each experiment starts
from HEAD plus your workspace changes, as `dvc exp run --queue` does). On 2 idle CPU cores one default
experiment takes 4-5 minutes; `--jobs 2` runs two at once (for machines with more cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from llmpipe.eval.seeds import (
    experiment_name,
    log_summary_run,
    queue_progress,
    queue_states,
    queue_task_ids,
    summarise,
    summary_markdown,
    sweep_experiments,
    up_to_stage,
    write_summary,
)

OUTPUT = Path("reports/seeds")
HEADLINES = ("finetune.qa_accuracy_heldout_people", "finetune.qa_accuracy_finetuned_people")


def dvc(*args: str) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"seeds: `dvc {' '.join(args)}` failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return result.stdout


def exp_show(all_commits: bool = False) -> list:
    """`dvc exp show --json`: the experiments on HEAD (DVC lists experiments under the commit they started
    from), or on every commit, for a sweep queued before a later commit."""
    return json.loads(dvc("exp", "show", "--json", *(["--all-commits"] if all_commits else [])))


def experiments_of(sweep: str, all_commits: bool = False, seeds: list[int] | None = None, shown: list | None = None):
    """The sweep's experiments (from `shown`, an `exp_show()` already read, if given); with `seeds`, only
    those seeds' experiments."""
    experiments = sweep_experiments(shown if shown is not None else exp_show(all_commits), sweep)
    return [experiment for experiment in experiments if seeds is None or experiment.seed in seeds]


def start_queue(jobs: int) -> None:
    # Each experiment runs in its own copy of the repository; "." first on the path makes its stages import that
    # copy's llmpipe, not the one an editable install points at (the workspace, which you may have edited since).
    # Workers already running (from an earlier `dvc queue start`) keep their environment: `dvc queue stop` them.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")]))}
    # The workers outlive `dvc queue start` and keep its output open: do not wait on it.
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)


def wait_for_queue(names: list[str], jobs: int, poll_seconds: float, earlier_tasks: set[str]) -> str:
    """Until none of `names` (not counting `earlier_tasks`) is queued or running (other sweeps' tasks may still
    be); restarts the workers if the queue stalls while some of ours still wait. Stalled means twice in a row, `poll_seconds` apart: a
    worker takes a moment to pick up the next task, and starting another meanwhile would run two at once."""
    stalled_before = False
    while True:
        time.sleep(poll_seconds)
        status = dvc("queue", "status")
        pending, stalled = queue_progress(status, names, earlier_tasks)
        if not pending:
            return status
        if stalled and stalled_before:
            print(f"seeds: nothing running with {len(pending)} experiment(s) waiting; starting {jobs} queue worker(s)")
            start_queue(jobs)
            stalled = False
        stalled_before = stalled


def run(args) -> None:
    done = {experiment.seed for experiment in experiments_of(args.sweep)}
    earlier_tasks = queue_task_ids(dvc("queue", "status"))  # tasks of the same names may be there from earlier sweeps
    queued = []
    for seed in args.seeds:
        if seed in done:
            print(f"{experiment_name(args.sweep, seed)}: already run, kept")
            continue
        overrides = [item for override in args.set for item in ("-S", override)]
        dvc("exp", "run", "--queue", "-n", experiment_name(args.sweep, seed), "-S", f"seed={seed}", *overrides,
            *args.targets)
        queued.append(experiment_name(args.sweep, seed))
    if queued:
        print(f"queued {', '.join(queued)}; running {args.jobs} at a time")
        start_queue(args.jobs)
        status = wait_for_queue(queued, args.jobs, args.poll_seconds, earlier_tasks)
        failed = [name for name in queued if queue_states(status, earlier_tasks).get(name) == "Failed"]
        if failed:
            print(f"failed: {', '.join(failed)} (see `dvc queue logs <name>`)", file=sys.stderr)
        wait_for_results([name for name in queued if name not in failed], args.sweep, args.poll_seconds)
    summary(args)


def wait_for_results(names: list[str], sweep: str, poll_seconds: float, timeout_seconds: float = 120) -> None:
    """`dvc queue status` says Success a moment before `dvc exp show` lists the experiment's results."""
    deadline = time.time() + timeout_seconds
    while time.time() < deadline:
        if set(names) <= {experiment.name for experiment in experiments_of(sweep)}:
            return
        time.sleep(poll_seconds)


def pipeline_stages() -> list[str]:
    return list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])


def summary(args) -> None:
    experiments = experiments_of(args.sweep, getattr(args, "all_commits", False), getattr(args, "only_seeds", None))
    if not experiments:
        sys.exit(f"seeds: no experiment named {experiment_name(args.sweep, 'N')} in `dvc exp show` "
                 "(queued before the last commit? add --all-commits)")
    stages = pipeline_stages()
    for target in args.targets:
        if target not in stages:
            sys.exit(f"seeds: --target {target}: not a stage of dvc.yaml ({', '.join(stages)})")
    last_stage = max(args.targets, key=stages.index) if args.targets else None
    experiments = up_to_stage(experiments, last_stage, stages)
    spread = summarise(experiments)
    overrides = getattr(args, "set", [])
    json_path, markdown_path = write_summary(OUTPUT, args.sweep, experiments, spread, overrides)
    print(summary_markdown(args.sweep, experiments, spread))
    run_id = log_summary_run(args.sweep, experiments, spread, overrides, markdown_path)
    print(f"wrote {markdown_path} and {json_path}; MLflow run {run_id} ('seeds {args.sweep}')")


def compare(args) -> None:
    from llmpipe.report.plots import plot_spread_against_param

    lines = ["| sweep | " + (f"{args.param} | " if args.param else "") + "seeds | "
             + " | ".join(f"{name} mean / min / max" for name in HEADLINES) + " |",
             "|---|" + ("---:|" if args.param else "") + "---:|" + "---|" * len(HEADLINES)]
    points: dict[str, list] = {name: [] for name in HEADLINES}
    shown = exp_show(args.all_commits)  # one `dvc exp show` for every sweep: each call takes tens of seconds
    for sweep in args.sweeps:
        experiments = experiments_of(sweep, seeds=args.only_seeds, shown=shown)
        if not experiments:
            sys.exit(f"seeds: no experiment named {experiment_name(sweep, 'N')} in `dvc exp show`")
        spread = summarise(experiments)
        x = experiments[0].param(args.param) if args.param else None
        cells = []
        for name in HEADLINES:
            s = spread.get(name)
            cells.append(f"{s.mean:.3f} / {s.min:.3f} / {s.max:.3f}" if s else "")
            if s and isinstance(x, (int, float)):
                points[name].append((x, s.mean, s.min, s.max))
        lines.append(f"| {sweep} | " + (f"{x} | " if args.param else "") + f"{len(experiments)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    name = "-vs-".join(args.sweeps) if len(args.sweeps) <= 3 else f"{args.sweeps[0]}-and-{len(args.sweeps) - 1}-more"
    (OUTPUT / f"compare-{name}.md").write_text(table)
    if args.param and any(points.values()):
        figure = OUTPUT / f"compare-{name}.png"
        plot_spread_against_param({k.split(".")[-1]: v for k, v in points.items() if v}, args.param,
                                  "QA exact-match accuracy", "QA accuracy over seeds", figure)
        print(f"wrote {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="queue and run the missing seeds, then summarise")
    run_parser.add_argument("sweep", help="the sweep's name; experiments are named <sweep>-seed<N>")
    run_parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    run_parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                            help="a param override for every seed, as in `dvc exp run -S`")
    run_parser.add_argument("--jobs", type=int, default=1, help="experiments at once (dvc queue start -j)")
    run_parser.add_argument("--target", dest="targets", action="append", default=[], metavar="STAGE",
                            help="run the pipeline up to this stage only (e.g. finetune: skips quantize and evaluate)")
    run_parser.add_argument("--poll-seconds", type=float, default=30.0,
                            help="how often to ask `dvc queue status` (each call costs about a CPU-second: "
                                 "every 5 s took 10-20%% of 2 cores from the experiments)")
    summary_parser = commands.add_parser("summary", help="summarise a sweep's experiments")
    summary_parser.add_argument("sweep")
    summary_parser.add_argument("--target", dest="targets", action="append", default=[], metavar="STAGE",
                                help="the sweep ran up to this stage: later stages' metrics are the baseline's, left out")
    summary_parser.add_argument("--all-commits", action="store_true", help="look for the experiments under every commit")
    compare_parser = commands.add_parser("compare", help="one table over sweeps (and a plot against --param)")
    compare_parser.add_argument("--all-commits", action="store_true", help="look for the experiments under every commit")
    compare_parser.add_argument("sweeps", nargs="+")
    compare_parser.add_argument("--param", help="dotted param key the sweeps differ in, e.g. data.world.paraphrases")
    for subcommand in (summary_parser, compare_parser):
        subcommand.add_argument("--seeds", dest="only_seeds", type=int, nargs="+", metavar="SEED",
                                help="only these seeds' experiments (default: all the sweep has)")
    args = parser.parse_args()
    {"run": run, "summary": summary, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
