"""`llmpipe sweep run | summary | compare`: a headline metric as a distribution over seeds.

    llmpipe sweep run default --seeds 1 2 3 4 5
    llmpipe sweep run paraphrases-1 --seeds 1 2 3 4 5 -S data.world.paraphrases=1
    llmpipe sweep run no-mixing -S data.world.mixed_training=false --target finetune
    llmpipe sweep summary default                    # summarise experiments already run
    llmpipe sweep compare default paraphrases-1 --param data.world.paraphrases   # a table and a plot

A sweep is the DVC experiments `<sweep>-seed<N>`; those that already have metrics are not run again, those that
failed or were killed are (until then, the summary lists them as failed, outside the statistics). The
summary goes to reports/seeds/<sweep>.md and .json and to one MLflow run `seeds <sweep>`. Run it from the
repository root with the pipeline's code committed (each experiment starts from HEAD plus your workspace).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from llmpipe.errors import PipelineError
from llmpipe.sweep.queue import (
    exp_show,
    queue_seeds,
    queue_states,
    queue_tasks,
    start_queue,
    wait_for_queue,
)
from llmpipe.sweep.summary import (
    experiment_name,
    failed_seeds,
    log_summary_run,
    succeeded,
    summarise,
    summary_markdown,
    sweep_experiments,
    up_to_stage,
    write_summary,
)

OUTPUT = Path("reports/seeds")
HEADLINES = ("finetune.qa_accuracy_heldout_people", "finetune.qa_accuracy_finetuned_people")


def experiments_of(sweep: str, all_commits: bool = False, seeds: list[int] | None = None, shown: list | None = None):
    """The sweep's experiments (from `shown`, an `exp_show()` already read, if given); with `seeds`, only those."""
    experiments = sweep_experiments(shown if shown is not None else exp_show(all_commits), sweep)
    return [experiment for experiment in experiments if seeds is None or experiment.seed in seeds]


def wait_for_results(names: list[str], sweep: str, poll_seconds: float, timeout_seconds: float = 120) -> None:
    """The queue says Success a moment before `dvc exp show` lists the experiment's results."""
    deadline = time.time() + timeout_seconds
    while time.time() < deadline:
        if set(names) <= {experiment.name for experiment in experiments_of(sweep) if not experiment.failed}:
            return
        time.sleep(poll_seconds)


def run(args) -> None:
    experiments = experiments_of(args.sweep)
    done = {experiment.seed for experiment in experiments if not experiment.failed}
    for seed in sorted(done & set(args.seeds)):
        print(f"{experiment_name(args.sweep, seed)}: already run, kept")
    for seed in sorted(set(failed_seeds(experiments)) & set(args.seeds) - done):
        print(f"{experiment_name(args.sweep, seed)}: failed or killed earlier; running it again")
    earlier_tasks = {task.rev for task in queue_tasks()}  # tasks of the same names may be there from earlier sweeps
    queued = queue_seeds(args.sweep, [seed for seed in args.seeds if seed not in done], args.set, args.targets)
    if queued:
        print(f"queued {', '.join(queued)}; running {args.jobs} at a time", flush=True)
        start_queue(args.jobs)
        tasks = wait_for_queue(queued, args.jobs, args.poll_seconds, earlier_tasks)
        failed = [name for name in queued if queue_states(tasks, earlier_tasks).get(name) == "Failed"]
        if failed:
            print(f"failed: {', '.join(failed)} (see `dvc queue logs <name>`)", flush=True)
        wait_for_results([name for name in queued if name not in failed], args.sweep, args.poll_seconds)
    summary(args)


def summary(args) -> None:
    experiments = experiments_of(args.sweep, getattr(args, "all_commits", False), getattr(args, "only_seeds", None))
    if not experiments:
        raise PipelineError(f"no experiment named {experiment_name(args.sweep, 'N')} in `dvc exp show` "
                            "(queued before the last commit? add --all-commits)")
    stages = list(yaml.safe_load(Path("dvc.yaml").read_text("utf-8"))["stages"])
    for target in args.targets:
        if target not in stages:
            raise PipelineError(f"--target {target}: not a stage of dvc.yaml ({', '.join(stages)})")
    last_stage = max(args.targets, key=stages.index) if args.targets else None
    experiments = up_to_stage(experiments, last_stage, stages)
    if not succeeded(experiments):
        raise PipelineError(f"{args.sweep}: every experiment failed (seed {', '.join(map(str, failed_seeds(experiments)))}"
                            f"); `dvc queue logs {experiments[0].name}` says why")
    spread = summarise(experiments)
    overrides = getattr(args, "set", [])
    json_path, markdown_path = write_summary(OUTPUT, args.sweep, experiments, spread, overrides)
    print(summary_markdown(args.sweep, experiments, spread))
    run_id = log_summary_run(args.sweep, experiments, spread, overrides, markdown_path)
    print(f"wrote {markdown_path} and {json_path}; MLflow run {run_id} ('seeds {args.sweep}')")


def compare(args) -> None:
    # deferred: matplotlib and torch take ~2 s to import; only `sweep compare --param` plots
    from llmpipe.report.plots import plot_spread_against_param

    lines = ["| sweep | " + (f"{args.param} | " if args.param else "") + "seeds | "
             + " | ".join(f"{name} mean / min / max" for name in HEADLINES) + " |",
             "|---|" + ("---:|" if args.param else "") + "---:|" + "---|" * len(HEADLINES)]
    points: dict[str, list] = {name: [] for name in HEADLINES}
    shown = exp_show(args.all_commits)  # one `dvc exp show` for every sweep: each call takes tens of seconds
    for sweep in args.sweeps:
        experiments = experiments_of(sweep, seeds=args.only_seeds, shown=shown)
        if not experiments:
            raise PipelineError(f"no experiment named {experiment_name(sweep, 'N')} in `dvc exp show`")
        if not succeeded(experiments):
            raise PipelineError(f"{sweep}: every experiment failed (seed {', '.join(map(str, failed_seeds(experiments)))})")
        spread = summarise(experiments)
        failed = failed_seeds(experiments)
        x = succeeded(experiments)[0].param(args.param) if args.param else None
        cells = []
        for name in HEADLINES:
            s = spread.get(name)
            cells.append(f"{s.mean:.3f} / {s.min:.3f} / {s.max:.3f}" if s else "")
            if s and isinstance(x, (int, float)):
                points[name].append((x, s.mean, s.min, s.max))
        seeds = f"{len(experiments) - len(failed)}" + (f" ({len(failed)} failed, excluded)" if failed else "")
        lines.append(f"| {sweep} | " + (f"{x} | " if args.param else "") + f"{seeds} | " + " | ".join(cells) + " |")
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


def add_sweep_commands(sweep_parser) -> None:
    """`llmpipe sweep`'s subcommands, on the parser the CLI gives (dispatch: `args.sweep_command`)."""
    commands = sweep_parser.add_subparsers(dest="sweep_command", required=True)
    run_parser = commands.add_parser("run", help="queue and run the missing seeds, then summarise")
    run_parser.add_argument("sweep", help="the sweep's name; experiments are named <sweep>-seed<N>")
    run_parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    run_parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                            help="a param override for every seed, as in `dvc exp run -S`")
    run_parser.add_argument("--jobs", type=int, default=1, help="experiments at once (dvc queue start -j)")
    run_parser.add_argument("--poll-seconds", type=float, default=30.0, help="how often to read the queue's state")
    summary_parser = commands.add_parser("summary", help="summarise a sweep's experiments")
    summary_parser.add_argument("sweep")
    compare_parser = commands.add_parser("compare", help="one table over sweeps (and a plot against --param)")
    compare_parser.add_argument("sweeps", nargs="+")
    compare_parser.add_argument("--param", help="dotted param key the sweeps differ in, e.g. data.world.paraphrases")
    for command in (run_parser, summary_parser):
        command.add_argument("--target", dest="targets", action="append", default=[], metavar="STAGE",
                             help="run (or ran) the pipeline up to this stage only (e.g. finetune)")
    for command in (summary_parser, compare_parser):
        command.add_argument("--all-commits", action="store_true", help="look for the experiments under every commit")
        command.add_argument("--seeds", dest="only_seeds", type=int, nargs="+", metavar="SEED",
                             help="only these seeds' experiments (default: all the sweep has)")


SWEEP_COMMANDS = {"run": run, "summary": summary, "compare": compare}
